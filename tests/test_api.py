"""The Python API: light import, the API functions (no callable modules), typed results, the docs
example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mme
from mme.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


def test_import_mme_is_light():
    code = (
        "import sys, mme; mme.ProtectConfig; "
        "print(sorted({'torch', 'open_clip'} & sys.modules.keys()))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]", out.stderr


def test_api_names_are_functions_that_wrap_the_stages(tmp_path):
    """Issue 22: ``mme.poison`` was the stage module made callable, so every stage imported the
    API module back. The four names are now mme.app.api's functions."""
    import types

    from mme.app import api
    from mme.ingest.prepare import (
        prepare as stage_function,  # the module's own function still works
    )

    for name in ("protect", "prepare", "poison", "evaluate"):
        assert isinstance(getattr(mme, name), types.FunctionType)
        assert getattr(mme, name) is getattr(api, name)

    manifest = mme.prepare(
        source="synthetic", out=tmp_path / "c", n_train=3, n_test=1, image_size=32
    )
    assert isinstance(manifest, mme.Manifest) and manifest.images("train") == 3
    assert callable(stage_function) and callable(mme.poison) and callable(mme.evaluate)
    with pytest.raises(ConfigError, match="n_train"):
        mme.prepare(source="synthetic", out=tmp_path / "d", n_train=0)


def test_evaluate_returns_typed_metrics(tiny_run, colour_shards):
    metrics = mme.evaluate(tiny_run["checkpoint"], colour_shards, device="cpu")
    assert isinstance(metrics, mme.RetrievalMetrics) and metrics.n_images == 16
    assert 0 <= metrics.i2t_r1 <= 100


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exec(compile(blocks[0], "docs/api.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "publish" / "metadata.jsonl").exists()
