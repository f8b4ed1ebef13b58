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


def fake_run(root: Path, losses: list[float], noise: bytes) -> Path:
    """A folder shaped like an `mme poison` run: out/manifest.json rounds, a shard, noise."""
    (root / "out").mkdir(parents=True)
    (root / "private").mkdir()
    rounds = [{"round": r, "surrogate_loss": v, "pgd_loss": v / 2} for r, v in enumerate(losses)]
    (root / "out" / "manifest.json").write_text(json.dumps({"rounds": rounds}))
    (root / "out" / "train-000000.tar").write_bytes(b"tar")
    (root / "private" / "noise.npy").write_bytes(noise)
    (root / "private" / "triggers.json").write_text("{}")
    return root


def test_compare_runs_judges_losses_by_tolerance_and_bytes_exactly(tmp_path, capsys):
    """scripts/compare_runs.py, what the multi-GPU part of gpu_check.sh reports with."""
    from compare_runs import main

    a = fake_run(tmp_path / "a", [2.0, 1.5], b"n1")
    b = fake_run(tmp_path / "b", [2.0002, 1.5], b"n1")
    c = fake_run(tmp_path / "c", [2.0], b"n2")
    assert main(["losses", str(a), str(b), "--tolerance", "1e-3"]) == 0
    assert main(["losses", str(a), str(b), "--tolerance", "1e-5"]) == 1
    assert main(["losses", str(a), str(c)]) == 1  # a round missing
    assert main(["bytes", str(a), str(b)]) == 0
    assert main(["bytes", str(a), str(c)]) == 1
    rows = capsys.readouterr().out.splitlines()
    assert "| a vs b | losses | surrogate_loss 1.00e-04, pgd_loss 1.00e-04 |" in rows[0]
    assert rows[-1].startswith("| a vs c | bytes | differ: ['noise.npy'] |")
    assert rows[-1].endswith("| FAIL |")


def test_gpu_check_script_parses_and_names_multigpu_not_measured():
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=REPO).returncode == 0
    assert "multigpu" in text and "NOT MEASURED" in text
