"""`mme protect`: one command from real photos to a verified, publishable folder (tiny, CPU)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mme import cli
from mme.app.protect import ProtectConfig, protect

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-dev"
TINY = [
    "--model", "mme-tiny-vit", "--rounds", "1", "--surrogate-steps", "1", "--pgd-steps", "1",
    "--trigger-rounds", "1", "--candidates", "2", "--batch-size", "8", "--device", "cpu",
]  # fmt: skip
TINY_POISON = dict(
    model="mme-tiny-vit", rounds=1, surrogate_steps=1, pgd_steps=1, trigger_rounds=1,
    candidates=2, batch_size=8, device="cpu", grid_samples=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """20 real Flickr8k photos, each with its captions in a same-named .txt."""
    if not (FLICKR / "captions.csv").exists():
        pytest.skip("needs ../shared/data/flickr8k-dev")
    captions: dict[str, list[str]] = {}
    with open(FLICKR / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"])
    out = tmp_path_factory.mktemp("photos")
    for name in list(captions)[:20]:
        shutil.copy(FLICKR / "images" / name, out / name)
        (out / name).with_suffix(".txt").write_text("\n".join(captions[name]) + "\n")
    return out


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


def test_protect_photos_from_outside_the_repo_without_params(photos, tmp_path):
    """The acceptance run: a fresh folder, no params.yaml, the real `mme` entry point."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mme", "protect", str(photos), "pub", *TINY]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "params.yaml").exists()
    assert "verified: yes" in done.stdout and "PRIVATE" in done.stdout
    pub, private = tmp_path / "pub", tmp_path / "pub.private"
    captions = [p for p in pub.glob("*.txt") if p.name != "README.txt"]
    assert len(list(pub.glob("*.png"))) == 20 and len(captions) == 20
    published = {p.name for p in pub.iterdir()}
    assert not published & {"noise.npy", "triggers.json", "manifest.json"}
    assert (private / "noise" / "noise.npy").exists() and (private / "README.txt").exists()
    assert not (private / "protected" / "noise.npy").exists()  # public-only, even in staging
    assert json.loads((private / "verify.json").read_text())["ok"] is True
    rows = [json.loads(line) for line in (pub / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all((pub / r["file_name"]).exists() and r["text"] for r in rows)
    # the captions carry the trigger words that only the private triggers.json names
    triggers = json.loads((private / "noise" / "triggers.json").read_text())
    text = dict(zip(triggers["ids"], triggers["trigger_text"], strict=True))
    assert all(r["text"].startswith(text[r["id"]] + " ") for r in rows)
    assert not any({"trigger_text", "trigger_ids", "protected"} & set(r) for r in rows)


def test_dry_run_plans_and_writes_nothing(photos, tmp_path, capsys):
    out = tmp_path / "pub"
    assert cli.main(["protect", str(photos), str(out), *TINY, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "20 images" in text and "time" in text and "disk" in text and "never publish" in text
    assert not out.exists() and not (tmp_path / "pub.private").exists()


def test_resume_skips_finished_stages_and_refuses_other_settings(
    photos, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("MME_TRACKING")  # protect's own default: no MLflow store in the cwd
    monkeypatch.chdir(tmp_path)
    cfg = ProtectConfig(input=photos, output=tmp_path / "pub", poison=TINY_POISON)
    first = protect(cfg)
    assert not (tmp_path / "mlflow.db").exists() and "MME_TRACKING" not in os.environ
    assert first.verified and first.images == 20 and first.protected == 20
    assert first.psnr_mean is not None and first.epsilon == 8
    with pytest.raises(Exception, match="--resume"):
        protect(cfg)  # an earlier run is there: say how to continue
    again = protect(cfg, resume=True)
    assert "done earlier" in capsys.readouterr().err
    assert again.model_dump(exclude={"seconds"}) == first.model_dump(exclude={"seconds"})
    other = cfg.model_copy(update={"poison": {**TINY_POISON, "epsilon": 4}})
    with pytest.raises(Exception, match="other settings"):
        protect(other, resume=True)


@pytest.mark.parametrize(
    "make_input, needle",
    [
        (lambda d: d / "missing", "neither a folder nor"),
        (lambda d: d, "overlaps"),  # OUTPUT inside INPUT
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, make_input, needle):
    inp = make_input(tmp_path)
    rc = cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_folder_without_captions_says_what_is_missing(tmp_path, capsys):
    if not (FLICKR / "images").exists():
        pytest.skip("needs ../shared/data/flickr8k-dev")
    inp = tmp_path / "in"
    inp.mkdir()
    for p in sorted((FLICKR / "images").glob("*.jpg"))[:2]:
        shutil.copy(p, inp / p.name)
    assert cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY]) == 2
    assert "needs captions" in capsys.readouterr().err


def test_never_writes_into_or_deletes_a_foreign_private_folder(photos, tmp_path, capsys):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "letter.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        argv = ["protect", str(photos), str(tmp_path / "pub"), "--private", str(mine), *extra]
        assert cli.main([*argv, *TINY]) == 2
        assert "not made by `mme protect`" in capsys.readouterr().err
    assert (mine / "letter.txt").read_text() == "keep me"


def test_protect_checks_every_image_once(tmp_path, monkeypatch):
    """Issue 22: `mme protect` verified the set twice (poison's own check before its manifest,
    then its verify stage): one check now, its report kept as verify.json."""
    from PIL import Image

    from mme.protection import verify as verify_module

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, rgb in enumerate([(220, 30, 30), (30, 180, 40), (30, 60, 220), (9, 9, 9)] * 2):
        Image.new("RGB", (40 + i, 36), rgb).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"picture {i}\na plain square number {i}\n")
    calls = []
    real = verify_module.verify
    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = ProtectConfig(input=photos, output=tmp_path / "pub", poison=TINY_POISON)
    result = protect(cfg)
    assert result.verified and result.images == 8 and len(calls) == 1
    report = json.loads((result.private / "verify.json").read_text())
    assert report["ok"] is True and report["n_checked"] == 8
