"""`mme protect`: one command from real photos to a verified, publishable folder (tiny, CPU).

The acceptance run of issue 19: 40 Flickr8k photos in a folder outside the repo, some re-saved
as 800x600 JPEG and some as PNG, come back under the same names, sizes and formats, and
`mme verify` passes them at that size; the dry run's measured estimate is within 30 % of it."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mme import cli
from mme.app.protect import ProtectConfig, protect
from mme.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-dev"
# the smallest run of every stage; one PGD step of 8 gives a full-size noise (JPEGs keep it)
TINY = [
    "--model", "mme-tiny-vit", "--rounds", "1", "--surrogate-steps", "1", "--pgd-steps", "1",
    "--step-size", "8", "--trigger-rounds", "1", "--candidates", "2", "--batch-size", "8",
    "--device", "cpu", "--threads", "1",
]  # fmt: skip
TINY_POISON = dict(
    model="mme-tiny-vit", rounds=1, surrogate_steps=1, pgd_steps=1, step_size=8,
    trigger_rounds=1, candidates=2, batch_size=8, device="cpu", grid_samples=2, threads=1,
)  # fmt: skip


# Captions in the tests below repeat words across an image's captions and across images: the
# default method (keyed) builds each image's noise from such words and refuses a set without any.


def flickr_captions() -> dict[str, list[str]]:
    if not (FLICKR / "captions.csv").exists():
        pytest.skip("needs ../shared/data/flickr8k-dev")
    captions: dict[str, list[str]] = {}
    with open(FLICKR / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["images"], []).append(row["caption"])
    return captions


def photo_folder(out: Path, n: int) -> dict[str, tuple[tuple[int, int], str]]:
    """``n`` Flickr8k photos with same-named .txt captions: every 4th re-saved as an 800x600
    JPEG, every 4th (offset 2) as PNG, the rest as they are; returns name -> (size, format)."""
    out.mkdir(parents=True)
    made = {}
    for i, (cell, caps) in enumerate(list(flickr_captions().items())[:n]):
        src, stem = FLICKR / cell, Path(cell).stem
        with Image.open(src) as im:
            if i % 4 == 1:
                im.convert("RGB").resize((800, 600)).save(out / f"{stem}.jpg", quality=90)
                name = f"{stem}.jpg"
            elif i % 4 == 2:
                im.convert("RGB").save(out / f"{stem}.png")
                name = f"{stem}.png"
            else:
                shutil.copy(src, out / f"{stem}.jpg")
                name = f"{stem}.jpg"
        (out / name).with_suffix(".txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
        with Image.open(out / name) as im:
            made[name] = (im.size, im.format)
    return made


@pytest.fixture(scope="module")
def accepted(tmp_path_factory) -> dict:
    """The acceptance run: `python -m mme protect` from a fresh folder without params.yaml."""
    tmp = tmp_path_factory.mktemp("accept")
    made = photo_folder(tmp / "photos", 40)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MME_TRACKING": "off"}
    argv = [sys.executable, "-m", "mme", "protect", "photos", "pub", *TINY]
    done = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True)
    return {"tmp": tmp, "made": made, "done": done, "env": env}


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


def test_photos_come_back_with_their_names_sizes_and_formats(accepted):
    done, tmp, made = accepted["done"], accepted["tmp"], accepted["made"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp / "params.yaml").exists() and "verified: yes" in done.stdout
    pub, private = tmp / "pub", tmp / "pub.private"
    images = {p.name for p in pub.iterdir() if p.suffix in (".jpg", ".png")}
    assert images == set(made)
    for name, (size, fmt) in made.items():
        with Image.open(pub / name) as im:
            assert (im.size, im.format) == (size, fmt), name
        assert (pub / name).with_suffix(".txt").read_text().count("\n") == 5
    assert not {p.name for p in pub.iterdir()} & {"noise.npy", "triggers.json", "manifest.json"}
    assert (private / "summary" / "before_after.png").is_file()
    assert "No pretrained weights loaded" not in done.stderr + done.stdout


def test_mme_verify_passes_the_published_folder_at_native_size(accepted, capsys, monkeypatch):
    monkeypatch.chdir(accepted["tmp"])
    assert cli.main(["verify", "--run", "pub.private", "--native", "pub"]) == 0
    assert "native size: 40 images (JPEG 30, PNG 10)" in capsys.readouterr().out


def test_metadata_names_no_local_path(accepted):
    """Issue 19: metadata.jsonl named the private folder's absolute path in `source`."""
    tmp = accepted["tmp"]
    text = (tmp / "pub" / "metadata.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 40 and all((tmp / "pub" / r["file_name"]).is_file() for r in rows)
    assert "source" not in rows[0] and str(tmp) not in text and "private" not in text
    assert {r["format"] for r in rows} == {"JPEG", "PNG"}


def test_published_folder_reads_back_with_prepare(accepted, tmp_path):
    """Item 2: a native export is re-ingested with `prepare --source folder` for training."""
    pub = accepted["tmp"] / "pub"
    argv = ["prepare", "--params", "none", "--source", "folder", "--input", str(pub)]
    assert cli.main([*argv, "--out", str(tmp_path / "again")]) == 0
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 40 and not manifest["skipped"]


def test_dry_run_estimate_is_within_30_percent_of_the_run(accepted, capsys):
    """The dry run times a short run of the real stages here; the acceptance run took
    `sum(seconds)` in the same settings on the same photos."""
    tmp = accepted["tmp"]
    state = json.loads((tmp / "pub.private" / "protect.json").read_text())
    real = sum(state["seconds"].values())
    argv = ["protect", str(tmp / "photos"), str(tmp / "dry"), *TINY, "--dry-run"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert not (tmp / "dry").exists() and not (tmp / "dry.private").exists()
    assert "40 images: JPEG 30, PNG 10" in text and "will skip  nothing" in text
    assert "profile    cpu" in text
    estimate = float(re.search(r"time +~(\d+) s", text).group(1))
    assert 0.7 * real <= estimate <= 1.3 * real, (estimate, real, text)


def test_dry_run_probe_pins_its_own_process(tmp_path, monkeypatch):
    """The probe runs in a fresh interpreter (`python -m mme.app.probe`), an entry point of its
    own: it pins the CPU kernels (poison.cpu_isa) before torch loads, as `mme protect` does,
    whatever its caller's environment holds."""
    from mme import cpuisa
    from mme.app import probe

    for key in cpuisa.PINS["avx2"]:
        monkeypatch.delenv(key, raising=False)
    items = []
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (60 * i, 90, 200)).save(buf, "PNG")
        items.append(("png", buf.getvalue(), ["a blue photo of a sky", f"a blue sky {i}"]))
    cfg = ProtectConfig(input=tmp_path / "in", output=tmp_path / "out", poison=TINY_POISON)
    timings = probe.run_probe(cfg, items)
    assert timings.images == 4 and timings.per_surrogate_pass > 0 and timings.per_noise_pass > 0


def test_dry_run_without_a_usable_photo_lists_why_and_exits_2(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(inp / "alone.png")
    assert cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "1 no_valid_captions (e.g. alone.png)" in out and "needs captions" in err
    assert len(err.strip().splitlines()) == 1


def test_failed_run_never_locks_out_a_rerun(tmp_path, capsys):
    """Issue 19: a failed run (a folder without captions) left OUT.private, and every rerun,
    --force or --resume, was refused as "not made by mme protect"."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i, rgb in enumerate([(200, 30, 30), (30, 180, 40), (30, 60, 220)]):
        Image.new("RGB", (48, 40), rgb).save(inp / f"p{i}.png")
    argv = ["protect", str(inp), str(tmp_path / "pub"), *TINY]
    assert cli.main(argv) == 2  # the command sees it before any work now
    assert "needs captions" in capsys.readouterr().err
    assert not (tmp_path / "pub.private").exists()
    same = {k: v for k, v in TINY_POISON.items() if k != "grid_samples"}  # = TINY
    failed = ProtectConfig(input=inp, output=tmp_path / "pub", poison=same)
    with pytest.raises(ConfigError, match="needs captions"):
        protect(failed)  # the API runs the stages: prepare fails
    assert (tmp_path / "pub.private").is_dir()  # the failed run's leftovers
    for i in range(3):
        (inp / f"p{i}.txt").write_text(f"a plain square number {i}\na plain square\n")
    assert cli.main(argv) == 2  # an earlier run is there: say how to go on
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*argv, "--resume"]) == 0
    assert cli.main([*argv, "--force"]) == 0
    assert len(list((tmp_path / "pub").glob("*.png"))) == 3


def test_resume_publishes_again_with_other_publish_settings(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 40), (60 * i, 90, 200)).save(inp / f"p{i}.jpg", quality=95)
        (inp / f"p{i}.txt").write_text(f"a blue card number {i}\na blue card\n")
    cfg = ProtectConfig(input=inp, output=tmp_path / "pub", poison=TINY_POISON)
    first = protect(cfg)
    assert first.verified and first.formats == {"JPEG": 3}
    again = protect(cfg.model_copy(update={"jpeg_quality": 100}), resume=True)
    err = capsys.readouterr().err
    assert "poison: done earlier" in err and "publish ..." in err.split("poison: done earlier")[1]
    assert again.verified
    with pytest.raises(Exception, match="other settings"):
        protect(cfg.model_copy(update={"poison": {**TINY_POISON, "epsilon": 4}}), resume=True)


def test_csv_column_error_is_one_line_naming_the_flag(tmp_path, capsys):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\na.jpg,a dog\n")
    assert cli.main(["protect", str(table), str(tmp_path / "pub"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'images'" in err[0] and "--image-column" in err[0]


def test_csv_input_gets_its_captions_back_in_a_csv(tmp_path):
    captions = list(flickr_captions().items())[:4]
    table = tmp_path / "in" / "captions.csv"
    (tmp_path / "in" / "images").mkdir(parents=True)
    with open(table, "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(["images", "caption"])
        for cell, caps in captions:
            shutil.copy(FLICKR / cell, tmp_path / "in" / cell)
            rows.writerows([cell, c] for c in caps)
    cfg = ProtectConfig(input=table, output=tmp_path / "pub", poison=TINY_POISON)
    assert protect(cfg).verified
    with open(tmp_path / "pub" / "captions.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert len(back) == sum(len(c) for _, c in captions) and set(back[0]) == {"images", "caption"}
    assert {r["images"] for r in back} == {cell for cell, _ in captions}
    assert all((tmp_path / "pub" / cell).is_file() for cell, _ in captions)


@pytest.mark.parametrize(
    "make_input, needle",
    [
        (lambda d: d / "missing", "neither a folder nor"),
        (lambda d: d, "overlaps"),  # OUTPUT inside INPUT
        (lambda d: (d / "empty").mkdir() or d / "empty", "no images in"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, make_input, needle):
    inp = make_input(tmp_path)
    rc = cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_no_space_left_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import errno

    from mme.app import protect as protect_module

    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (40, 40), (9, 90, 200)).save(inp / "a.png")
    (inp / "a.txt").write_text("a blue square\n")

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(cfg.private_dir / "clean"))

    monkeypatch.setattr(protect_module, "_stage_prepare", full)
    assert cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the plan's line, the stage, the error
    assert "no space left" in err[-1] and "--resume" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_dry_run_lists_what_it_will_skip(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, name in enumerate(("good", "fine")):
        Image.new("RGB", (40, 30), (200, 30, 30 + 90 * i)).save(inp / f"{name}.png")
        (inp / f"{name}.txt").write_text(f"a red card called {name}\n")
    Image.new("RGB", (40, 30), (30, 30, 200)).save(inp / "uncaptioned.png")
    (inp / "broken.jpg").write_bytes(b"not a jpeg at all")
    (inp / "broken.txt").write_text("a broken file\n")
    assert cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "2 images: PNG 2; 40x30 to 40x30 px" in text and "time       ~" in text
    assert "1 no_valid_captions (e.g. uncaptioned.png)" in text
    assert "1 unreadable_image (e.g. broken.jpg)" in text
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.private").exists()


def test_dry_run_says_when_the_run_would_stop(tmp_path, capsys):
    """One usable photo: MEM needs two (a contrastive loss); the probe finds it out."""
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(inp / "one.png")
    (inp / "one.txt").write_text("a red card\n")
    assert cli.main(["protect", str(inp), str(tmp_path / "pub"), *TINY, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "1 images: PNG 1" in out and "not estimated" in out
    assert len(err.strip().splitlines()) == 1 and "needs at least 2" in err
    assert "mme-probe" not in err


def test_never_writes_into_or_deletes_a_foreign_folder(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (40, 40), (9, 90, 200)).save(inp / "a.png")
    (inp / "a.txt").write_text("a blue square\n")
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "letter.txt").write_text("keep me")
    for flag, target in (("--private", "documents"), (None, "documents")):
        for extra in ([], ["--force"], ["--resume"]):
            out = tmp_path / ("pub" if flag else target)
            argv = ["protect", str(inp), str(out), *([flag, str(mine)] if flag else []), *extra]
            assert cli.main([*argv, *TINY]) == 2
            assert "not made by `mme protect`" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["letter.txt"]


def test_protect_checks_every_working_size_image_once(tmp_path, monkeypatch):
    """Issue 22: `mme protect` verified the set twice (poison's own check before its manifest,
    then its verify stage): one check now, its report kept as verify.json."""
    from mme.protection import verify as verify_module

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, rgb in enumerate([(220, 30, 30), (30, 180, 40), (30, 60, 220), (9, 9, 9)] * 2):
        Image.new("RGB", (40 + i, 36), rgb).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a plain picture {i}\na plain square number {i}\n")
    calls = []
    real = verify_module.verify
    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = ProtectConfig(input=photos, output=tmp_path / "pub", poison=TINY_POISON)
    result = protect(cfg)
    assert result.verified and result.images == 8 and len(calls) == 1
    report = json.loads((result.private / "verify.json").read_text())
    assert report["ok"] is True and report["n_checked"] == 8
    assert result.formats == {"PNG": 8} and result.stage_seconds.keys() == {
        "prepare", "poison", "verify", "publish"
    }  # fmt: skip


@pytest.mark.parametrize("fmt, expect", [("working", "p0.png"), ("shards", "train-000000.tar")])
def test_working_size_formats_stay_for_researchers(tmp_path, fmt, expect):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 40), (60 * i, 90, 200)).save(photos / f"p{i}.jpg")
        (photos / f"p{i}.txt").write_text(f"a blue card number {i}\na blue card\n")
    cfg = ProtectConfig(input=photos, output=tmp_path / "pub", poison=TINY_POISON, format=fmt)
    result = protect(cfg)
    assert result.verified and (tmp_path / "pub" / expect).is_file()
    if fmt == "working":
        with Image.open(tmp_path / "pub" / expect) as im:
            assert im.size == (64, 64)
        text = (tmp_path / "pub" / "metadata.jsonl").read_text()
        assert str(tmp_path) not in text and '"source"' not in text
