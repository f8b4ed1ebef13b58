"""mme.victim.evaluate / ``mme evaluate``: embeddings of a split, metrics.json, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mme import cli, models
from mme.config import EvaluateConfig
from mme.victim import evaluate

NO_PARAMS = ["--params", "none"]  # no params file: the built-in defaults
STABLE_KEYS = {
    *(f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")),
    *(f"chance_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
    "rsum",
    "chance_rsum",
    "rsum_over_chance",
    "n_images",
    "n_captions",
}


def test_embed_split_covers_all_captions(colour_shards: Path) -> None:
    model, tok = models.create_model("mme-tiny-rn")
    img, txt, owner = evaluate.embed_split(model, tok, colour_shards, "test", 5, "cpu")
    assert img.shape == (16, 128) and txt.shape == (32, 128)
    assert owner.tolist() == [i for i in range(16) for _ in range(2)]


def test_untrained_model_is_near_chance(colour_shards: Path) -> None:
    cfg = EvaluateConfig(batch_size=7, device="cpu")
    m = evaluate.evaluate_checkpoint(cfg, None, "mme-tiny-vit", colour_shards, "test")
    assert STABLE_KEYS <= set(m)
    assert (m["n_images"], m["n_captions"]) == (16, 32)
    assert all(isinstance(v, float | int) for v in m.values())


def test_model_name_required_without_record(tmp_path: Path, colour_shards: Path) -> None:
    model, _ = models.create_model("mme-tiny-vit")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="--model"):
        evaluate.evaluate_checkpoint(EvaluateConfig(), tmp_path / "plain.pt", None, colour_shards)
    m = evaluate.evaluate_checkpoint(
        EvaluateConfig(device="cpu"), tmp_path / "plain.pt", "mme-tiny-vit", colour_shards
    )
    assert m["n_images"] == 16


def test_evaluate_cli_end_to_end(tiny_run: dict, colour_shards: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["mlflow_uri"])
    monkeypatch.setenv("MME_TRACKING", "on")
    out = tiny_run["run_dir"] / "metrics.json"
    argv = ["evaluate", *NO_PARAMS, "--checkpoint", str(tiny_run["checkpoint"])]
    assert cli.main([*argv, "--shards", str(colour_shards), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    assert STABLE_KEYS <= set(metrics)
    assert (metrics["n_images"], metrics["n_captions"]) == (16, 32)
    assert 0 <= metrics["rsum"] <= 600
    table = capsys.readouterr().out
    assert "image->text" in table and "rsum" in table

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tiny_run["mlflow_uri"])
    exp = client.get_experiment_by_name("mme")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")
    assert run.data.metrics["rsum"] == pytest.approx(metrics["rsum"])
    assert run.data.params["victim_model"] == "mme-tiny-vit"
    assert run.data.params["method"] == "clean"
    assert {"metrics.json", "recall.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }


def test_evaluate_cli_errors(tmp_path: Path, colour_shards: Path, capsys) -> None:
    argv = ["evaluate", *NO_PARAMS, "--shards", str(colour_shards)]
    assert cli.main([*argv, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "mme train" in capsys.readouterr().err
    model, _ = models.create_model("mme-tiny-vit")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert cli.main([*argv, "--checkpoint", str(tmp_path / "plain.pt"), "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_format_table() -> None:
    m = {f"{d}_r{k}": 10.0 * k for d in ("i2t", "t2i") for k in (1, 5, 10)}
    m |= {"i2t_medr": 3.0, "t2i_medr": 4.0, "i2t_meanr": 5.5, "t2i_meanr": 6.5}
    m |= {"rsum": 320.0, "chance_rsum": 32.0, "rsum_over_chance": 10.0}
    m |= {"n_images": 10, "n_captions": 50}
    table = evaluate.format_table(m)
    assert "x10.00" in table and "image->text" in table and "text->image" in table
