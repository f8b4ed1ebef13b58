"""The MLflow UI that ``make mlflow-ui`` opens, in headless Chromium (Debian's ``chromium``):
the runs view of the experiment in "Model training" mode, sorted by the headline metric."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mme.track import tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(url: str, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"]
    cmd += ["--virtual-time-budget=20000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def test_runs_view_in_model_training_mode(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MME_TRACKING", "on")
    for method, score in (("clean", 49.0), ("mem", 10.3)):
        params = {"stage": "evaluate", "method": method, "victim_model": "mme-tiny-vit"}
        with tracking.start_run("synthetic", f"evaluate-{method}", params):
            tracking.log_metrics({"rsum_over_chance": score, "i2t_r1": 1.0, "t2i_r1": 1.0})
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(base, timeout=2)
                break
            except OSError:
                time.sleep(1)
        url = tracking.ui_url(base, "synthetic")
        dom = _chromium(url, "--dump-dom")
        shot = tmp_path / "runs.png"
        _chromium(url, f"--screenshot={shot}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "evaluate-clean" in dom and "evaluate-mem" in dom  # the runs table, not an overview
    assert "Model training" in dom and "0_rsum_over_chance" in dom  # mode and sort key
    assert dom.index("evaluate-clean") < dom.index("evaluate-mem")  # best rsum/chance first
    assert shot.stat().st_size > 10_000
