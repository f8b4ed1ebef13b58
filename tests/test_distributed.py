"""`torchrun -m mme poison` (CPU, gloo, 1, 2 and 4 processes) and the single-process helpers.

Agreement across process counts (docs/scaling.md): every rank makes every random draw (batches,
captions, shuffles, EOT transformations) and BatchNorm uses the whole batch's statistics, so N
processes compute the one-process losses up to float rounding, EOT on (the default), for a ViT
and a BatchNorm (RN) surrogate. Measured: largest relative difference of the per-round losses
~1e-5 (2 rounds, 16 images); the tests allow 1e-3. The bytes of N > 1 are not the bytes of N = 1
(rounding flips a few PGD signs); the same N gives the same bytes (resume test).

Slow (``-m slow``, > 30 s each): the 4-process runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mme import distributed, imageops, shards
from mme.config import ConfigError, DataConfig, PoisonConfig
from mme.ingest.prepare import prepare

FLAGS = (
    "--params none --method mem --rounds 2 --surrogate-steps 2 --batch-size 8"
    " --trigger-rounds 1 --candidates 2 --pgd-steps 2 --device cpu --grid-samples 2"
    " --write-workers 1 --threads 1"
).split()  # EOT on: the default
VIT, RN = "mme-tiny-vit", "mme-tiny-rn"
LOSSES = ("surrogate_loss", "trigger_loss", "pgd_loss", "mean_abs_noise_px")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    prepare(DataConfig(source="synthetic", out=out, n_train=16, n_test=4, image_size=64))
    return out


REPO = Path(__file__).resolve().parents[1]


def command(nproc: int | None, args: list[str], **env: str) -> tuple[list[str], dict]:
    """``python -m mme ARGS`` (nproc None) or ``torchrun --nproc_per_node nproc -m mme ARGS``,
    with this checkout's code; returns (argv, environment)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    base |= {"MME_TRACKING": "off", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **env}
    launcher = [sys.executable, "-m", "mme"]
    if nproc is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(nproc), "-m", "mme"]
    return [*launcher, *args], base


def launch(nproc: int | None, args: list[str], **env: str) -> subprocess.CompletedProcess:
    argv, base = command(nproc, args, **env)
    proc = subprocess.run(argv, env=base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def poison_args(clean: Path, root: Path, model: str = VIT) -> list[str]:
    args = ["poison", *FLAGS, "--model", model, "--clean", str(clean)]
    return args + ["--out", str(root / "out"), "--private", str(root / "private")]


def run_poison(
    clean: Path, root: Path, nproc: int | None, model: str = VIT
) -> subprocess.CompletedProcess:
    return launch(nproc, poison_args(clean, root, model))


def outputs(root: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in shards.shard_paths(root / "out", "train")}
    for name in ("noise.npy", "triggers.json", "grid.png"):
        files[name] = (root / "private" / name).read_bytes()
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert "out" not in manifest["config"]  # no local path in the public manifest (issue 20)
    files["manifest"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def rounds(root: Path) -> list[dict]:
    return json.loads((root / "out" / "manifest.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def runs(clean, tmp_path_factory):
    """``runs(model, nproc)``: the folder of that run (nproc None: the plain command), made once
    per module and shared by the tests."""
    made: dict[tuple[str, int | None], Path] = {}

    def get(model: str, nproc: int | None) -> Path:
        if (model, nproc) not in made:
            root = tmp_path_factory.mktemp(f"{model}-{nproc or 'plain'}")
            run_poison(clean, root, nproc, model)
            made[model, nproc] = root
        return made[model, nproc]

    return get


def test_torchrun_with_one_process_gives_the_plain_commands_bytes(clean, runs, tmp_path):
    run_poison(clean, tmp_path, 1)
    assert outputs(tmp_path) == outputs(runs(VIT, None))


def test_torchrun_with_two_processes_verifies(clean, runs):
    root = runs(VIT, 2)
    assert not (root / "private" / "work").exists()  # rank 0 cleaned up after success
    verify = [sys.executable, "-m", "mme", "verify", "--clean", str(clean)]
    verify += ["--protected", str(root / "out"), "--private", str(root / "private")]
    proc = subprocess.run(verify, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two, one = (
        json.loads((r / "out" / "manifest.json").read_text()) for r in (root, runs(VIT, None))
    )
    assert two["n_protected"] == one["n_protected"] == 16


@pytest.mark.parametrize(
    "model, nproc",
    [
        (VIT, 2),
        (RN, 2),
        pytest.param(VIT, 4, marks=pytest.mark.slow),
        pytest.param(RN, 4, marks=pytest.mark.slow),
    ],
)
def test_n_processes_give_the_one_process_losses_with_eot_on(runs, model, nproc):
    """The same per-round losses (and mean |noise|) as one process within 1e-3 relative, with
    the default EOT on, for a ViT and a BatchNorm surrogate."""
    many, one = rounds(runs(model, nproc)), rounds(runs(model, None))
    assert len(many) == len(one) == 2
    for a, b in zip(many, one, strict=True):
        assert a.keys() == b.keys()
        for key in LOSSES:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-3), key


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, distributed.World(0, 1, 0)),
        ({"WORLD_SIZE": "1", "RANK": "0"}, distributed.World(0, 1, 0)),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, distributed.World(3, 4, 1)),
    ],
)
def test_world_from_env(monkeypatch, env, want):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.from_env() == want


@pytest.mark.parametrize("size, n", [(1, 5), (2, 5), (3, 7), (4, 4)])
def test_shards_of_a_batch_are_disjoint_and_cover_it(size, n):
    parts = [distributed.shard(distributed.World(r, size), torch.arange(n)) for r in range(size)]
    assert sorted(torch.cat(parts).tolist()) == list(range(n))
    assert [len(p) for p in parts] == distributed.counts(distributed.World(0, size), n)


def test_single_process_helpers_do_nothing():
    one, t = distributed.World(), torch.arange(3)
    assert distributed.all_sum_(one, t.clone()).tolist() == [0, 1, 2]
    assert distributed.gather_rows(one, t, [3]) is t
    distributed.barrier(one)


def test_a_disk_too_small_for_the_store_stops_before_any_work(clean, tmp_path, monkeypatch):
    import shutil

    from mme.protection.poison import poison

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    monkeypatch.setenv("MME_TRACKING", "off")
    cfg = PoisonConfig(
        clean=clean, out=tmp_path / "o", private=tmp_path / "p", work=tmp_path / "w", device="cpu"
    )
    with pytest.raises(ConfigError, match=r"poison.work = .*needs 0\.00 GB .* only 0\.00 GB"):
        poison(cfg)
    assert not list((tmp_path / "w").rglob("clean_u8.npy"))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_the_store_lives_in_the_chosen_work_folder(clean, tmp_path, monkeypatch, capfd):
    from mme.protection.poison import poison

    monkeypatch.setenv("MME_TRACKING", "off")
    kw = dict(rounds=1, surrogate_steps=1, batch_size=8, pgd_steps=1, trigger_rounds=0)
    cfg = PoisonConfig(
        clean=clean, out=tmp_path / "o", private=tmp_path / "p", work=tmp_path / "w",
        device="cpu", write_workers=1, **kw,
    )  # fmt: skip
    poison(cfg)
    assert f"mme poison: work store {tmp_path / 'w'}/mme-poison-" in capfd.readouterr().err
    assert not (tmp_path / "p" / "work").exists()
    assert list((tmp_path / "w").iterdir()) == []  # its own subfolder, removed after success


def test_the_work_folder_may_not_be_inside_the_public_folder(clean, tmp_path):
    from mme.protection.poison import check_inputs

    cfg = PoisonConfig(
        clean=clean, out=tmp_path / "o", private=tmp_path / "p", work=tmp_path / "o" / "w"
    )
    with pytest.raises(ConfigError, match="poison.work"):
        check_inputs(cfg)


@pytest.mark.parametrize(
    "epochs, n, batch, want",
    [(None, 16, 8, 7), (1.0, 16, 8, 2), (0.1, 16, 8, 1), (2.5, 100, 8, 32)],
)
def test_surrogate_steps_as_a_fraction_of_an_epoch(epochs, n, batch, want):
    from types import SimpleNamespace

    from mme.protection.methods.surrogate import surrogate_steps

    cfg = SimpleNamespace(surrogate_epochs=epochs, surrogate_steps=7, batch_size=batch)
    loop = SimpleNamespace(cfg=cfg, store=SimpleNamespace(n=n))
    assert surrogate_steps(loop) == want


def test_torchrun_train_with_two_processes_has_one_writer(tmp_path):
    """open_clip_train runs DDP on both ranks; one checkpoint, one train.json, one MLflow run."""
    import mlflow

    data = tmp_path / "data"  # 4 shards: webdataset hands each rank whole shards
    prepare(DataConfig(source="synthetic", out=data, n_train=16, n_test=4, shard_size=4))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--params", "none", "--shards", str(data), "--run-dir", str(tmp_path / "r")]
    args += ["--model", "mme-tiny-rn", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    proc = launch(2, [*args, "--workers", "0"], MME_TRACKING="on", MLFLOW_TRACKING_URI=uri)
    assert "2 process(es)" in proc.stderr
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    assert not (tmp_path / "r" / "trainer" / "checkpoints").exists()  # finalized by rank 0
    assert json.loads((tmp_path / "r" / "train.json").read_text())["n_pairs"] == 80
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mme")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    assert run.info.status == "FINISHED"


class Killed(Exception):
    pass


def test_resume_refuses_a_checkpoint_of_another_number_of_processes(clean, tmp_path, monkeypatch):
    from mme.protection.poison import poison
    from mme.protection.resume import CKPT, work_dir

    monkeypatch.setenv("MME_TRACKING", "off")
    kw = dict(rounds=2, surrogate_steps=1, batch_size=8, pgd_steps=1, trigger_rounds=0)
    cfg = PoisonConfig(
        clean=clean, out=tmp_path / "o", private=tmp_path / "p", work=tmp_path / "w",
        device="cpu", write_workers=1, **kw,
    )  # fmt: skip

    def kill(r, stats):
        raise Killed

    with pytest.raises(Killed):
        poison(cfg, on_round=kill)
    path = work_dir(cfg) / CKPT
    ckpt = torch.load(path, weights_only=True)
    assert "world_size" not in ckpt  # one process: the checkpoint is as before
    torch.save({**ckpt, "world_size": 2}, path)
    with pytest.raises(ConfigError, match="made by 2 process"):
        poison(cfg, resume=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_load_decodes_the_same_pixels_with_any_number_of_processes(tmp_path, workers):
    import numpy as np

    from mme.protection.pools import PixelDecoder

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (150, 40, 40, 3), dtype=np.uint8)
    blobs = [shards.encode_png(p) for p in pixels]
    want = np.stack([imageops.to_working_resolution(b, 32) for b in blobs])
    clean = np.lib.format.open_memmap(tmp_path / "c.npy", "w+", np.uint8, (150, 3, 32, 32))
    with PixelDecoder(clean, workers) as dec:
        for i, b in enumerate(blobs):
            dec.add(i, b)
    assert np.array_equal(np.load(tmp_path / "c.npy"), want)


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (from /proc): torchrun starts each worker in a session
    of its own, so killing torchrun's process group leaves the workers running."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, by id (a crash of the whole run)."""
    import signal

    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_two_process_rn_run_resumes_to_the_same_bytes(clean, runs, tmp_path):
    """SIGKILL to torchrun and both workers once the first round's checkpoint exists;
    ``--resume`` with 2 processes then continues from it (it does not start afresh) and gives
    the uninterrupted 2-process run's bytes. The surrogate is the BatchNorm one: its running
    statistics must be the same on both ranks for rank 0's checkpoint to restore rank 1."""
    import time

    args = poison_args(clean, tmp_path, RN)
    argv, env = command(2, args)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "private" / "work" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    time.sleep(1)  # a worker left running would finish the run and remove the work folder
    assert ckpt.exists() and not (tmp_path / "out" / "manifest.json").exists()
    assert torch.load(ckpt, weights_only=True)["round"] == 0
    resumed = launch(2, [*args, "--resume"])
    assert "starting fresh" not in resumed.stderr
    assert outputs(tmp_path) == outputs(runs(RN, 2))


@pytest.mark.parametrize(
    "nproc, env, noted", [(1, {}, False), (2, {}, True), (2, {"LOCAL_WORLD_SIZE": "2"}, False)]
)
def test_a_params_nproc_other_than_the_runs_is_noted(monkeypatch, capsys, nproc, env, noted):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    world = distributed.World(0, int(env.get("LOCAL_WORLD_SIZE", 1)))
    distributed.note_nproc(world, nproc, "poison.nproc")
    err = capsys.readouterr().err
    assert ("poison.nproc = 2 is what dvc.yaml passes" in err) == noted
    assert "error" not in err.lower() and "start it with" not in err  # a note, not a complaint


def test_every_dvc_stage_that_poisons_or_trains_goes_through_torchrun():
    """dvc.yaml: poison stages use poison.nproc, every victim training victim.nproc (the
    baseline and attacked-copy stages included), so one setting scales the whole pipeline."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    launcher = "torchrun --standalone --nproc_per_node ${%s.nproc} -m mme %s"
    seen = set()
    for name, stage in stages.items():
        cmd = " ".join(stage.get("do", stage)["cmd"].split())
        for command, section in (("poison", "poison"), ("train", "victim")):
            if f"mme {command}" in cmd:
                assert launcher % (section, command) in cmd, name
                assert cmd.count(f"mme {command}") == 1, name  # no plain `mme ...` besides
                seen.add(name)
    assert seen >= {"poison", "poison_baseline", "train_baseline", "train_attacked"}
