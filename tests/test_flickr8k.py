"""The real-photo profile (params.flickr8k.yaml) on a handful of Flickr8k photos with tiny models:
every section is valid, and scripts/flickr8k.sh (dvc.yaml's stages in order, what the GPU check
runs) goes from the CSVs to the clean vs protected table."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mme.config import SECTIONS, load_section

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "params.flickr8k.yaml"
DATA = REPO.parent / "shared" / "data"
TINY = {
    "POISON_ARGS": "--model mme-tiny-vit --rounds 1 --surrogate-steps 1 --batch-size 4 "
    "--pgd-steps 1 --trigger-rounds 1 --candidates 2 --device cpu --no-compile",
    "VICTIM_ARGS": "--model mme-tiny-vit --epochs 1 --batch-size 8 --warmup 1 --device cpu",
    "EVAL_ARGS": "--device cpu",
    "PREPARE_ARGS": "--allow-absolute-paths",  # subset_csv writes absolute paths (issue 20)
}


def test_profile_sections_are_valid_and_describe_the_protocol():
    sections = {name: load_section(name, PROFILE) for name in SECTIONS}
    data, poison, victim = sections["data"], sections["poison"], sections["victim"]
    assert data.source == "csv" and "flickr8k-train" in str(data.train_csv)
    assert "flickr8k-dev" in str(data.test_csv)
    assert poison.clean == data.out and poison.model == victim.model == "RN50"
    assert (poison.batch_size, poison.pgd_steps, poison.epsilon) == (128, 8, 8)


def subset_csv(split: str, n_images: int, out: Path) -> Path:
    """The first ``n_images`` photos of ``split`` with all their captions, absolute paths."""
    root = DATA / split
    with open(root / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = list(dict.fromkeys(r["images"] for r in rows))[:n_images]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["images", "caption"])
        writer.writeheader()
        for r in rows:
            if r["images"] in keep:
                writer.writerow({"images": str(root / r["images"]), "caption": r["caption"]})
    return out


@pytest.mark.slow  # ~35 s of CPU: seven stage processes
@pytest.mark.skipif(not (DATA / "flickr8k-train").is_dir(), reason="needs ../shared/data")
def test_profile_runs_end_to_end_on_a_handful_of_photos(tmp_path):
    env = {
        **os.environ,
        **TINY,
        "TRAIN_CSV": str(subset_csv("flickr8k-train", 12, tmp_path / "train.csv")),
        "TEST_CSV": str(subset_csv("flickr8k-dev", 6, tmp_path / "dev.csv")),
        "MME": f"{sys.executable} -m mme",
        "MME_TRACKING": "off",
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "run"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "flickr8k.sh"), str(out), str(PROFILE)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 12 and manifest["splits"]["test"]["images"] == 6
    prot = json.loads((out / "protected" / "manifest.json").read_text())
    assert prot["n_protected"] == 12 and prot["verify"]["ok"]
    for run in ("clean", "protected"):
        assert json.loads((out / "metrics" / f"{run}.json").read_text())["n_images"] == 6
    stages = [line.split()[0] for line in (out / "times.txt").read_text().splitlines()]
    assert stages[0] == "prepare" and stages[-1] == "report"
    assert "protected" in (out / "table.md").read_text()
