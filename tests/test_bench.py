"""`mme bench` on CPU with a tiny config: every phase runs, the table and JSON are complete."""

from __future__ import annotations

import json

import pytest

from mme import cli
from mme.app.bench import PHASES, BenchConfig, run_bench

TINY = ["--model", "mme-tiny-vit", "--batch-size", "4", "--batches", "2", "--steps", "1"]
TINY += ["--pgd-steps", "1", "--candidates", "2", "--device", "cpu"]


def test_bench_cli_times_every_phase_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["phases"]) == set(PHASES)
    for name, r in record["phases"].items():
        assert r["value"] > 0 and r["img_per_s"] > 0, name
        assert r["share_of_ceiling"] == pytest.approx(
            r["img_per_s"] / record["phases"]["ceiling"]["img_per_s"]
        )
    assert record["phases"]["ceiling"]["note"] == "eager"
    assert record["image_size"] == 64 and record["precision"] == "fp32"
    table = capsys.readouterr().out
    assert "| pgd | " in table and "pair-steps/s" in table and "share of ceiling" in table


def test_bench_rejects_unknown_phase():
    with pytest.raises(ValueError, match="unknown phases"):
        run_bench(BenchConfig(model="mme-tiny-vit", phases=["pgd", "warp"], device="cpu"))


def test_bench_cli_reports_a_bad_flag(capsys):
    assert cli.main(["bench", "--batch-size", "1"]) == 2
    assert "batch_size" in capsys.readouterr().err
