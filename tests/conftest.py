"""Shared fixtures: tiny solid-colour shards and one tiny victim trained on them (per session)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mme import shards
from mme.env import prepare_process_env

# Nothing in the tests may reach the network (weights, tokenizers, telemetry).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# in-process poisonings run the default poison.cpu_isa: its pins must precede torch's import;
# tests and their subprocesses share 2 cores in CI: OpenMP threads spin briefly, then sleep
prepare_process_env("avx2")

# The smallest poisoning that still runs every step of MEM (tiny surrogate, 2 rounds of one
# surrogate and one PGD step, 2 HotFlip candidates): seconds on a CPU.
TINY_POISON = dict(
    model="mme-tiny-vit",
    rounds=2,
    surrogate_steps=1,
    batch_size=8,
    trigger_rounds=1,
    candidates=2,
    pgd_steps=1,
    device="cpu",
    grid_samples=2,
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
}


def colour_samples(split: str, n: int, size: int = 32, seed: int = 0) -> list[shards.Sample]:
    """``n`` solid-colour images (shade jittered) with two captions naming the colour."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        rgb = np.clip(np.array(COLOURS[name]) + rng.integers(-12, 13, 3), 0, 255)
        pixels = np.broadcast_to(rgb.astype(np.uint8), (size, size, 3))
        captions = [f"a {name} square", f"a picture that is entirely {name}"]
        meta = {"id": f"{split}-{i:03d}", "source": "test", "colour": name}
        out.append(
            shards.Sample(f"{split}-{i:03d}", shards.encode_png(pixels), "png", captions, meta)
        )
    return out


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard folder with 40 train and 16 test solid-colour images (2 captions each)."""
    out = tmp_path_factory.mktemp("colour_shards")
    shards.write_shards(out, "train", colour_samples("train", 40, seed=0))
    shards.write_shards(out, "test", colour_samples("test", 16, seed=1))
    return out


@pytest.fixture(scope="session")
def tiny_run(colour_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``mme train`` (CLI, 1 epoch, CPU) once per session, tracked in a temporary MLflow store.

    Returns ``{"run_dir", "checkpoint", "mlflow_uri", "rc"}``.
    """
    from mme import cli

    root = tmp_path_factory.mktemp("tiny_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = root / "run"
    argv = ["train", "--params", "none", "--shards", str(colour_shards)]
    argv += ["--run-dir", str(run_dir), "--model", "mme-tiny-vit", "--epochs", "1"]
    argv += ["--batch-size", "16", "--warmup", "2", "--device", "cpu", "--workers", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MME_TRACKING", "on")
        rc = cli.main(argv)
    return {
        "run_dir": run_dir,
        "checkpoint": run_dir / "checkpoint.pt",
        "mlflow_uri": uri,
        "rc": rc,
    }


@pytest.fixture(scope="session", autouse=True)
def no_stray_outputs_in_the_repo():
    """A test that forgets to name an output folder would write into the repository's own
    default folders (e.g. ``data/private/mem``, the private noise): fail the session then."""
    repo = Path(__file__).resolve().parent.parent
    watched = [repo / "data" / "private", repo / "data" / "protected", repo / "data" / "attacked"]
    before = {p: p.exists() for p in watched}
    yield
    created = [str(p.relative_to(repo)) for p in watched if p.exists() and not before[p]]
    assert not created, f"tests wrote into the repository: {created}"


@pytest.fixture(scope="session")
def tiny_poison() -> dict:
    """:data:`TINY_POISON` (a fresh copy): ``PoisonConfig(clean=..., out=..., private=...,
    **tiny_poison)``; a test changes what it is about (``tiny_poison | {"rounds": 1}``)."""
    return dict(TINY_POISON)


@pytest.fixture(scope="session")
def orchestrated():
    """Factory of the Prefect/MLflow test environment: ``with orchestrated(root) as root:`` runs
    a Prefect test server with PREFECT_HOME under ``root``, a temporary MLflow store
    (``MME_TRACKING`` on, no parent run inherited) and ``root`` as the working directory."""
    import contextlib

    @contextlib.contextmanager
    def environment(root: Path, timeout: int = 120):
        from prefect.settings import (
            PREFECT_HOME,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH,
            PREFECT_SERVER_ANALYTICS_ENABLED,
            temporary_settings,
        )
        from prefect.testing.utilities import prefect_test_harness

        from mme.track import tracking

        settings = {
            PREFECT_HOME: root / "prefect",
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / "prefect" / "storage",
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
        }
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
            mp.setenv("MME_TRACKING", "on")
            mp.setenv("OMP_NUM_THREADS", "1")
            for key in ("MME_PARENT_RUN", "DVC_EXP_NAME", tracking.PARENT_ID_ENV):
                mp.delenv(key, raising=False)
            mp.chdir(root)
            with temporary_settings(updates=settings), prefect_test_harness(timeout):
                yield root

    return environment
