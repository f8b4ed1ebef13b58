"""The GPU check's preparation, on the CPU: the wheel list is pinned, the Flickr8k repack, and
scripts/gpu_check.sh's bench part with a tiny model (no wheels are downloaded here)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "flickr8k-dev"
sys.path.insert(0, str(REPO / "scripts"))


def test_every_gpu_wheel_is_pinned_in_constraints():
    make = (REPO / "Makefile").read_text()
    block = re.search(r"GPU_WHEELS \?= (.*?)\n(?!\t)", make, re.S).group(1)
    names = block.replace("\\", " ").split()
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().split()}
    assert len(names) == 9 and all(n.lower() in pins for n in names)


@pytest.mark.skipif(not DEV.is_dir(), reason="needs ../shared/data")
def test_repack_keeps_the_layout_at_the_new_size(tmp_path):
    from repack_flickr8k import repack

    assert repack(DEV, tmp_path, side=96, quality=90, limit=10) == 10
    with open(tmp_path / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = {r["images"] for r in rows}
    assert len(images) == 10 and len(rows) == 50
    for rel in images:
        with Image.open(tmp_path / rel) as im:
            assert im.size == (96, 96) and im.format == "JPEG"


def test_repack_refuses_paths_leaving_the_folder(tmp_path):
    from repack_flickr8k import repack

    src = tmp_path / "src"
    src.mkdir()
    (src / "captions.csv").write_text("images,caption\n../evil.jpg,a dog\n")
    with pytest.raises(ValueError, match="leaves the folder"):
        repack(src, tmp_path / "dst", 96, 90, None)


def test_gpu_check_bench_part_runs_on_cpu(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PY": sys.executable,
        "BENCH_ARGS": "--model mme-tiny-vit --batch-size 4 --batches 1 --steps 1 --pgd-steps 1 "
        "--device cpu --phases ceiling pgd",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "bench"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert set(json.loads((tmp_path / "bench.json").read_text())["phases"]) == {"ceiling", "pgd"}
    assert "| pgd |" in (tmp_path / "bench.md").read_text()
    assert "torch" in (tmp_path / "env.txt").read_text()
    assert (tmp_path / "log.txt").stat().st_size > 0
