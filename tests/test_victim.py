"""mme.victim.train / ``mme train``: pairs view, trainer argv, log parsing, a CPU end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mme import cli, models, shards
from mme.config import ConfigError, VictimConfig
from mme.victim import open_clip_adapter as adapter
from mme.victim import train as victim

NO_PARAMS = ["--params", "none"]  # no params file: the built-in defaults


def test_profiles_fill_unset_fields() -> None:
    fast, paper = VictimConfig(), VictimConfig(profile="paper")
    assert fast.model == "mme-tiny-vit"
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.wd) == (
        "RN50",
        32,
        128,
        5e-4,
        0.2,
    )
    assert VictimConfig(profile="paper", epochs=3, model=None).epochs == 3  # explicit wins
    assert VictimConfig(profile="paper", model=None).model == "RN50"  # None = unset


def test_pairs_are_caption_major(colour_shards: Path, tmp_path: Path) -> None:
    pairs = list(victim.iter_pairs(colour_shards, "train"))
    assert len(pairs) == 80
    assert [p.id for p in pairs[:2]] == ["train-000_c0", "train-001_c0"]
    assert pairs[40].id == "train-000_c1"
    assert all(len(p.captions) == 1 for p in pairs)
    pattern, n_pairs, n_shards = victim.write_pairs(colour_shards, "train", tmp_path)
    assert (n_pairs, n_shards) == (80, 1) and pattern.endswith("pairs-000000.tar")
    back = list(shards.iter_samples(tmp_path, "pairs"))
    assert back[0].captions == ["a red square"]
    assert back[40].captions == ["a picture that is entirely red"]


def test_trainer_argv(tmp_path: Path) -> None:
    cfg = VictimConfig(
        epochs=2, batch_size=8, workers=4, device="cpu", pretrained=tmp_path / "p.pt"
    )
    argv = adapter.trainer_argv(cfg, tmp_path, "x.tar", n_pairs=100, n_shards=2)
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    assert flags["--precision"] == "fp32" and flags["--device"] == "cpu"
    assert flags["--workers"] == "2"  # clamped to the shard count
    assert flags["--train-num-samples"] == "100" and flags["--report-to"] == ""
    assert flags["--pretrained"] == str(tmp_path / "p.pt")
    assert adapter.resolve_precision("auto", torch.device("cuda")) == "amp_bf16"


def test_parse_trainer_log(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_text(
        "2026-01-01,00:00:00 | INFO | Start epoch 0\n"
        "2026-01-01,00:00:01 | INFO | Train Epoch: 0 [ 16/64 (25%)] Data (t): 0.1 Batch (t): 0.2, "
        "80/s, 80/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 2.5 (2.5) "
        "Loss: 2.5000 (2.5000)\n"
        "2026-01-01,00:00:02 | INFO | Train Epoch: 1 [64/64 (100%)] Data (t): 0.1 Batch (t): 0.2, "
        "80/s, 80/s/gpu LR: 1.5e-05 Logit Scale: 14.3 Contrastive_loss: 1.25 (1.5) "
        "Loss: 1.2500 (1.5000)\n"
    )
    rows = adapter.parse_trainer_log(log, batch_size=16)
    assert rows == [
        {"step": 0, "epoch": 0, "loss": 2.5, "lr": 1e-4, "logit_scale": 14.286},
        {"step": 7, "epoch": 1, "loss": 1.25, "lr": 1.5e-5, "logit_scale": 14.3},
    ]


def test_data_provenance(tmp_path: Path) -> None:
    assert victim.data_provenance(tmp_path)["method"] == "clean"
    shards.write_json_atomic(
        tmp_path / "manifest.json", {"poison": {"method": "mem", "epsilon": 8}}
    )
    prov = victim.data_provenance(tmp_path)
    assert prov["method"] == "mem" and prov["epsilon"] == 8 and prov["trigger_len"] is None
    assert len(prov["data_manifest_sha256"]) == 64


def test_train_end_to_end(tiny_run: dict, colour_shards: Path) -> None:
    assert tiny_run["rc"] == 0
    run_dir = tiny_run["run_dir"]
    assert not (run_dir / "pairs").exists()  # temporary view removed
    assert not (run_dir / "trainer" / "checkpoints").exists()  # slimmed into checkpoint.pt
    assert (run_dir / "trainer" / "out.log").exists()
    ck = torch.load(tiny_run["checkpoint"], map_location="cpu", weights_only=True)
    assert set(ck) == {"epoch", "name", "state_dict", "mme"} and ck["epoch"] == 1
    assert ck["mme"]["model"] == "mme-tiny-vit" and ck["mme"]["n_pairs"] == 80
    model, _ = models.create_model("mme-tiny-vit", pretrained=tiny_run["checkpoint"])
    assert models.image_size(model) == 64
    summary = json.loads((run_dir / "train.json").read_text())
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    lines = (run_dir / "train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr,logit_scale" and len(lines) >= 2
    assert (run_dir / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_logged_to_mlflow(tiny_run: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tiny_run["mlflow_uri"])
    exp = client.get_experiment_by_name("mme")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    assert run.info.status == "FINISHED"
    assert run.data.params["victim_model"] == "mme-tiny-vit"
    assert run.data.params["epochs"] == "1" and run.data.params["method"] == "clean"
    assert "train_loss" in run.data.metrics
    assert client.get_metric_history(run.info.run_id, "train_loss")
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_loss.csv", "train_loss.png", "train.json"} <= logged


def test_rerun_into_same_run_dir(colour_shards: Path, tmp_path: Path, monkeypatch) -> None:
    """open_clip_train refuses an existing log folder; train_victim clears its old outputs."""
    monkeypatch.setenv("MME_TRACKING", "off")
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "out.log").write_text("stale\n")  # as left by an earlier run
    (tmp_path / "checkpoint.pt").write_text("stale")
    cfg = VictimConfig(model="mme-tiny-rn", epochs=1, batch_size=40, device="cpu", workers=0)
    ckpt = victim.train_victim(cfg, colour_shards, tmp_path)
    assert ckpt == tmp_path / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["mme"]["model"] == "mme-tiny-rn"
    assert "stale" not in (tmp_path / "trainer" / "out.log").read_text()


def test_bad_model_name(colour_shards: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", *NO_PARAMS, "--shards", str(colour_shards), "--run-dir", str(tmp_path)]
    assert cli.main([*argv, "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "mme-tiny-vit" in err
    assert not (tmp_path / "trainer").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_forcing_missing_cuda_fails_early(colour_shards: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", *NO_PARAMS, "--shards", str(colour_shards), "--run-dir", str(tmp_path)]
    assert cli.main([*argv, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_shards(tmp_path: Path, capsys) -> None:
    assert cli.main(["train", *NO_PARAMS, "--shards", str(tmp_path)]) == 2
    assert "mme prepare" in capsys.readouterr().err


def test_cpu_threads_restores() -> None:
    before = torch.get_num_threads()
    with victim.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with victim.cpu_threads(0):
        assert torch.get_num_threads() == before


def test_same_seed_same_training(
    tiny_run: dict, colour_shards: Path, tmp_path, monkeypatch
) -> None:
    """Seeded end to end: a second run with tiny_run's settings gives the same weights (the
    sample shuffle buffer used to be seeded by the clock)."""
    monkeypatch.setenv("MME_TRACKING", "off")
    cfg = VictimConfig(
        model="mme-tiny-vit", epochs=1, batch_size=16, warmup=2, device="cpu", workers=1
    )
    again = victim.train_victim(cfg, colour_shards, tmp_path)
    first = torch.load(tiny_run["checkpoint"], weights_only=True)["state_dict"]
    second = torch.load(again, weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    loss = (tmp_path / "train_loss.csv").read_text()
    assert loss == (tiny_run["run_dir"] / "train_loss.csv").read_text()


def test_manifest_sha256_is_the_dataset_version(tmp_path: Path) -> None:
    """The train run logs the dataset version of its shards (its definition: test_manifest)."""
    assert shards.manifest_sha256(tmp_path) is None
    assert victim.data_provenance(tmp_path)["data_manifest_sha256"] is None
    record = {"name": "train-000000.tar", "count": 1, "sha256": "0" * 64}
    shards.write_json_atomic(
        tmp_path / "manifest.json", {"splits": {"train": {"shards": [record]}}}
    )
    want = shards.manifest_sha256(tmp_path)
    assert want is not None and len(want) == 64
    assert victim.data_provenance(tmp_path)["data_manifest_sha256"] == want


def test_one_caption_per_draw_tokenizes_one_line_seeded() -> None:
    import open_clip

    tok = open_clip.get_tokenizer("mme-tiny-vit")
    text = "a red square\n\na picture that is entirely red\n"
    a, b = adapter.OneCaption(tok, seed=3), adapter.OneCaption(tok, seed=3)
    got_a = [a(text)[0] for _ in range(20)]
    got_b = [b(text)[0] for _ in range(20)]
    options = tok(["a red square", "a picture that is entirely red"])
    assert all(torch.equal(x, y) for x, y in zip(got_a, got_b, strict=True))  # seeded
    assert all(any(torch.equal(x, o) for o in options) for x in got_a)  # one whole caption
    assert {int((x != 0).sum()) for x in got_a} == {int((o != 0).sum()) for o in options}
    assert a.context_length == tok.context_length  # everything else is the tokenizer's


@pytest.mark.parametrize(
    ("workers", "device", "cores", "want"),
    [(None, "cpu", 16, 1), (None, "cuda", 16, 14), (None, "cuda", 64, 16), (None, "cuda", 2, 1)]
    + [(3, "cuda", 16, 3), (0, "cpu", 16, 0)],
)
def test_resolve_workers(monkeypatch, workers, device, cores, want) -> None:
    monkeypatch.setattr(adapter.os, "cpu_count", lambda: cores)
    assert adapter.resolve_workers(workers, torch.device(device)) == want


@pytest.mark.parametrize(("n", "workers", "want"), [(30000, 14, 1000), (6000, 14, 429), (5, 8, 1)])
def test_view_shard_size_gives_every_worker_a_shard(n, workers, want) -> None:
    assert victim.view_shard_size(n, workers) == want


def test_images_view_reads_the_shards_in_place(colour_shards: Path, tmp_path: Path) -> None:
    """Default view: no per-caption copy; an epoch still holds one draw per caption."""
    cfg = VictimConfig(model="mme-tiny-vit", device="cpu")
    data, n_pairs, n_shards = victim.training_data(
        cfg, colour_shards, tmp_path, torch.device("cpu")
    )
    assert data == shards.brace_pattern(colour_shards, "train") and (n_pairs, n_shards) == (80, 1)
    assert not (tmp_path / "pairs").exists()
    pairs = VictimConfig(model="mme-tiny-vit", device="cpu", view="pairs", workers=2)
    data, n_pairs, n_shards = victim.training_data(
        pairs, colour_shards, tmp_path, torch.device("cpu")
    )
    assert (n_pairs, n_shards) == (80, 2) and (tmp_path / "pairs").is_dir()


def test_trainer_gets_the_one_caption_tokenizer_and_workers_can_receive_it() -> None:
    import pickle

    import open_clip_train.main as trainer

    original = trainer.get_tokenizer
    with adapter.one_caption_per_draw(seed=0):
        tok = trainer.get_tokenizer("mme-tiny-vit")
        assert isinstance(tok, adapter.OneCaption)
        copy = pickle.loads(pickle.dumps(tok))  # spawn-started data-loader workers
        assert torch.equal(copy("a dog\na cat")[0], tok("a dog\na cat")[0])
    assert trainer.get_tokenizer is original


def test_images_view_epoch_holds_one_draw_per_caption(tiny_run: dict) -> None:
    """40 images x 2 captions at batch 16: 5 steps an epoch, not the 2 of one pass over images
    (the trainer's with_epoch repeats the shards until the epoch is full)."""
    log = (tiny_run["run_dir"] / "trainer" / "out.log").read_text()
    assert "[80/80 (100%)]" in log
    steps = [int(line.split(",")[0]) for line in
             (tiny_run["run_dir"] / "train_loss.csv").read_text().splitlines()[1:]]  # fmt: skip
    assert max(steps) == 80 // 16 - 1


def test_trainer_output_once_without_model_printout(monkeypatch, capsys) -> None:
    """Issue 14: under Prefect every trainer line came twice (the trainer's stderr handler and
    the console handler already on the root logger), with the whole module printout."""
    import io
    import logging

    import open_clip_train.main
    from open_clip_train.logger import setup_logging

    def fake_main(argv):
        setup_logging(None, logging.INFO)  # what open_clip_train does: + a stderr handler
        logging.info("Model:")
        logging.info("CLIP(\n  (visual): VisionTransformer(...)\n)")
        logging.info("Train Epoch: 0 [8/16] Loss: 4.1")
        logging.getLogger("mme.other").warning("a library warning")

    console = io.StringIO()
    existing = logging.StreamHandler(console)  # e.g. Prefect's console handler
    root = logging.getLogger()
    root.addHandler(existing)
    monkeypatch.setattr(open_clip_train.main, "main", fake_main)
    try:
        adapter.run_trainer([])
    finally:
        root.removeHandler(existing)
    shown = console.getvalue() + capsys.readouterr().err
    assert shown.count("Train Epoch: 0") == 1
    assert "VisionTransformer" not in shown and "Model:" not in shown
    assert "a library warning" in console.getvalue()  # other loggers still reach it


def test_batch_larger_than_the_data_fails_before_training(colour_shards: Path, tmp_path) -> None:
    """Issue 14 (README's `--param victim='{"epochs": 2}'` on a 64-image params.yaml: batch 128):
    open_clip_train drops partial batches and repeats the stream, so it decoded images forever."""
    cfg = VictimConfig(model="mme-tiny-vit", epochs=1, batch_size=64, device="cpu", workers=1)
    with pytest.raises(ConfigError, match="at most 40"):
        victim.train_victim(cfg, colour_shards, tmp_path / "run")
    assert not (tmp_path / "run" / "trainer").exists()
