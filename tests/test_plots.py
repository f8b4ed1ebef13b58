"""Pictures (:mod:`mme.track.plots`): PNGs from loss rows and metrics; none without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from mme.track import plots

ROWS = [
    {"step": s, "epoch": 0, "loss": 5.0 / (1 + s), "lr": 1e-3, "logit_scale": 14.3}
    for s in range(5)
]
METRICS = {f"{d}_r{k}": float(k * 5) for d in ("i2t", "t2i") for k in (1, 5, 10)}
CHANCE = {f"chance_{d}_r{k}": k / 5 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize(
    "rows", [ROWS, [{k: v for k, v in r.items() if k != "logit_scale"} for r in ROWS]]
)
def test_loss_curve(tmp_path: Path, rows: list[dict]) -> None:
    out = plots.loss_curve(rows, tmp_path / "sub" / "loss.png", "tiny")
    assert out == tmp_path / "sub" / "loss.png"
    width, height = _png_size(out)
    assert width > height > 100


@pytest.mark.parametrize(
    "curves", [{"clean": METRICS | CHANCE}, {"a": METRICS, "b": METRICS | CHANCE}]
)
def test_recall_chart(tmp_path: Path, curves: dict) -> None:
    out = plots.recall_chart(curves, tmp_path / "recall.png", "t")
    assert _png_size(out)[0] > 500


def test_nothing_to_draw(tmp_path: Path) -> None:
    assert plots.loss_curve([], tmp_path / "a.png") is None
    assert plots.recall_chart({}, tmp_path / "b.png") is None
    assert not list(tmp_path.iterdir())


def test_without_matplotlib_skips(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert plots.loss_curve(ROWS, tmp_path / "a.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
