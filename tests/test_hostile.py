"""Hostile and careless input: each test is one attack (or accident) and is named after it.

Every case must end in a clear message or a counted skip, with no write outside the output, no
hang and bounded memory. See docs/threat-model.md for what the published set may reveal.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mme import cli, fsio, imageops, limits, shards
from mme.config import ConfigError, DataConfig, PoisonConfig
from mme.ingest.prepare import prepare
from mme.protection.export import export
from mme.protection.poison import claim_outputs, poison
from mme.protection.resume import CKPT, work_dir

PUBLIC_MEMBERS = {"png", "json", "txt"}  # all a protected sample may hold
PUBLIC_META = {
    "id",
    "source",
    "sha256",
    "width",
    "height",
    "method",
    "epsilon",
}  # never the trigger, its position or the protected flag: those are private (triggers.json)


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "clean"
    prepare(DataConfig(source="synthetic", out=out, n_train=16, n_test=4, image_size=64))
    return out


@pytest.fixture(scope="module")
def protected(clean, tiny_poison) -> PoisonConfig:
    cfg = PoisonConfig(
        clean=clean, out=clean.parent / "pub", private=clean.parent / "priv", **tiny_poison
    )
    poison(cfg)
    return cfg


def png(rgb=(200, 30, 30), size: int = 32) -> bytes:
    return shards.encode_png(np.full((size, size, 3), rgb, np.uint8))


def tar_of(path: Path, members: dict[str, bytes], **open_kw) -> Path:
    with tarfile.open(path, "w", **open_kw) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------ undoing the protection


def test_published_set_gives_back_no_clean_image(clean, protected):
    """`dvc push` of the public folder (or an export of it) must not allow protected - noise =
    clean: no noise, no clean pixels, no comparison grid, no list of protected images."""
    pub = protected.out
    assert {p.name for p in pub.iterdir()} == {fsio.OWNER, "manifest.json", "train-000000.tar"}
    assert {"noise.npy", "triggers.json", "grid.png"} <= {
        p.name for p in protected.private.iterdir()
    }
    clean_px = {
        s.id: imageops.to_working_resolution(s.image_bytes, 64)
        for s in shards.iter_samples(clean, "train")
    }
    with tarfile.open(pub / "train-000000.tar") as tar:
        assert {m.name.split(".", 1)[1] for m in tar} == PUBLIC_MEMBERS
    for s in shards.iter_samples(pub, "train"):
        assert set(s.meta) == PUBLIC_META  # metadata only: no pixels, no noise
        assert not np.array_equal(s.image().transpose(2, 0, 1), clean_px[s.id])
    manifest = (pub / "manifest.json").read_text()
    # a description, not data: a few hundred numbers at most (16 images x 3x64x64 px = 196608)
    assert manifest.count(",") < 1000 and str(protected.private) not in manifest
    out = pub.parent / "export"
    export(pub, out)
    assert not {"noise.npy", "triggers.json", "grid.png"} & {p.name for p in out.rglob("*")}


@pytest.fixture(scope="module")
def protected_random(clean, tiny_poison) -> PoisonConfig:
    """Triggers at random word positions on half of the images: the layouts with most to hide."""
    root = clean.parent / "random"
    cfg = PoisonConfig(
        clean=clean,
        out=root / "pub",
        private=root / "priv",
        trigger_position="random",
        protect_fraction=0.5,
        **tiny_poison,
    )
    poison(cfg)
    return cfg


# what names a trigger, its word position or the protected images (or recomputes them: seed)
PRIVATE_KEYS = {"trigger_text", "trigger_ids", "trigger_word", "protected", "clean_sha256", "seed"}


def leaks(text: str, triggers: dict) -> list[str]:
    """Keys of :data:`PRIVATE_KEYS`, trigger texts and trigger id lists anywhere in a JSON text."""
    found, todo = [], [json.loads(text)]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            found += sorted(PRIVATE_KEYS & set(x))
            todo += x.values()
        elif isinstance(x, list):
            found += [str(x)] if x and x in triggers["trigger_ids"] else []
            todo += x
        elif isinstance(x, str) and x in triggers["trigger_text"]:
            found.append(x)
    return found


def test_published_files_do_not_name_the_trigger(clean, protected_random, tmp_path):
    """The metadata named each caption's trigger words, their ids and word position and the
    protected flag: a data user stripped the trigger exactly, wherever it was. No public file
    (shard member, manifest.json, an export's metadata.jsonl) may; verify still catches a
    moved trigger and a tampered triggers.json (from the private folder)."""
    pub, priv = protected_random.out, protected_random.private
    triggers = json.loads((priv / "triggers.json").read_text())
    assert len(triggers["trigger_word"]) == 16 and 0 < sum(triggers["protected"]) < 16
    with tarfile.open(pub / "train-000000.tar") as tar:
        for m in tar:
            if m.name.endswith(".json"):
                assert not leaks(tar.extractfile(m).read().decode(), triggers), m.name
    assert not leaks((pub / "manifest.json").read_text(), triggers)
    for fmt in ("folder", "webdataset"):
        export(pub, tmp_path / fmt, fmt)
    for line in (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        del record["text"], record["captions"]  # the captions themselves, as in <id>.txt
        assert not leaks(json.dumps(record), triggers)
    assert not leaks((tmp_path / "webdataset" / "manifest.json").read_text(), triggers)

    samples = list(shards.iter_samples(pub, "train"))
    row = triggers["protected"].index(True)
    s = samples[row]
    moved = [f"{triggers['trigger_text'][row]} {c}" for c in clean_captions(clean)[s.id]]
    if moved == s.captions:  # its trigger was drawn at word 0: move it to the end
        moved = [f"{c} {triggers['trigger_text'][row]}" for c in clean_captions(clean)[s.id]]
    samples[row] = shards.Sample(s.id, s.image_bytes, s.image_ext, moved, s.meta)
    bad = tmp_path / "moved"
    bad.mkdir()
    shards.write_shards(bad, "train", samples)
    (bad / "manifest.json").write_bytes((pub / "manifest.json").read_bytes())
    from mme.protection.verify import verify

    assert verify(clean, bad, private=priv).violations["caption"] == [s.id]
    forged = tmp_path / "forged"
    shutil.copytree(priv, forged)
    triggers["trigger_ids"][row] = [i + 1 for i in triggers["trigger_ids"][row]]
    (forged / "triggers.json").write_text(json.dumps(triggers))
    assert s.id in verify(clean, pub, private=forged).offending_ids


def clean_captions(clean: Path) -> dict[str, list[str]]:
    return {s.id: s.captions for s in shards.iter_samples(clean, "train")}


# ------------------------------------------------------------------------ writing and executing


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_crafted_shard_key_escapes_export_folder(tmp_path, capsys, fmt):
    """A protected shard whose sample key is a path must not write outside --out (nor be passed
    on as it is in a WebDataset export)."""
    prot = tmp_path / "prot"
    prot.mkdir()
    target = tmp_path / "victim"
    target.mkdir()
    evil = str(target / "owned")  # an absolute key: `--out / "<key>.png"` is victim/owned.png
    tar_of(
        prot / "train-000000.tar",
        {f"{evil}.png": png(), f"{evil}.txt": b"x", f"{evil}.json": b"{}"},
    )
    shards.write_json_atomic(prot / "manifest.json", {"splits": {"train": {"images": 1}}})
    argv = ["export", "--protected", str(prot), "--out", str(tmp_path / "pub"), "--format", fmt]
    assert cli.main(argv) == 2
    assert "not KEY.EXT" in capsys.readouterr().err
    assert not any(target.iterdir()) and not (tmp_path / "pub").exists()


@pytest.mark.parametrize("key", ["../up", "", "x\x00y", "a/../../b", "/etc/x"])
def test_path_like_name_never_resolves_outside_destination(tmp_path, key):
    with pytest.raises(fsio.UnsafePath):
        fsio.resolve_under(tmp_path, f"{key}.png" if key else key)


def test_planted_checkpoint_runs_no_code_on_resume(clean, tmp_path, tiny_poison):
    """`--resume` used to unpickle <work>/checkpoint.pt: a planted one ran code."""
    marker = tmp_path / "pwned"
    cfg = PoisonConfig(clean=clean, out=tmp_path / "out", private=tmp_path / "priv", **tiny_poison)

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with claim_outputs(cfg):  # a killed run's folders, with a planted checkpoint
        pass
    work = work_dir(cfg)
    work.mkdir(parents=True)
    (work / CKPT).write_bytes(pickle.dumps({"config_hash": Payload()}, protocol=2))
    with pytest.raises(ConfigError, match="not a checkpoint mme can load safely"):
        poison(cfg, resume=True)
    assert not marker.exists()


def test_planted_object_array_as_noise_is_refused_by_verify(clean, protected, tmp_path):
    """A noise.npy holding pickled objects must not be unpickled by `mme verify --private`."""
    priv = tmp_path / "priv"
    priv.mkdir()
    (priv / "triggers.json").write_bytes((protected.private / "triggers.json").read_bytes())
    np.save(priv / "noise.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    from mme.protection.verify import verify

    report = verify(clean, protected.out, private=priv)
    assert not report.ok and "noise.npy is unreadable" in " ".join(report.errors)


# ------------------------------------------------------------------------------- deleting data


def test_export_force_onto_parent_of_input_deletes_nothing(tmp_path, protected, capsys):
    """`mme export --protected D/prot --out D --force` deleted D/prot, D/clean and D's files."""
    d = tmp_path / "D"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    prot = d / "prot"
    for src in protected.out.iterdir():
        (prot / src.name).parent.mkdir(exist_ok=True)
        (prot / src.name).write_bytes(src.read_bytes())
    before = files_under(d)
    assert cli.main(["export", "--protected", str(prot), "--out", str(d), "--force"]) == 2
    assert "contains the input" in capsys.readouterr().err
    assert files_under(d) == before


def test_export_force_onto_unrelated_folder_deletes_nothing(tmp_path, protected, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    assert (
        cli.main(["export", "--protected", str(protected.out), "--out", str(home), "--force"]) == 2
    )
    assert "only an earlier export" in capsys.readouterr().err
    assert (home / "thesis.tex").read_text() == "years of work"


def test_prepare_out_equal_to_its_input_is_refused(tmp_path, capsys):
    """`mme prepare --source webdataset --input X --out X` overwrote X while reading it."""
    x = tmp_path / "X"
    x.mkdir()
    tar_of(
        x / "a.tar",
        {f"k{i}.png": png((i * 10, 0, 0)) for i in range(4)}
        | {f"k{i}.txt": b"a cap" for i in range(4)},
    )
    before = files_under(x)
    for out in (x, x / "inner", tmp_path):
        argv = ["prepare", "--source", "webdataset", "--input", str(x), "--out", str(out)]
        assert cli.main(argv) == 2
        assert "data.out" in capsys.readouterr().err
    assert files_under(x) == before


def test_failed_prepare_rerun_keeps_previous_version(tmp_path):
    """A re-run that fails used to delete the previous manifest first."""
    out = tmp_path / "shards"
    prepare(DataConfig(source="synthetic", out=out, n_train=4, n_test=2, image_size=32))
    before = files_under(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no usable images"):
        prepare(DataConfig(source="folder", input=empty, out=out))
    assert files_under(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_prepare_onto_a_folder_it_did_not_make_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "diary.txt").write_text("private")
    with pytest.raises(ConfigError, match="not made by `mme prepare`"):
        prepare(DataConfig(source="synthetic", out=home, n_train=4, n_test=2, image_size=32))
    assert (home / "diary.txt").read_text() == "private"


# ------------------------------------------------------------------- wrong results that look right


def test_resume_onto_a_remade_clean_set_is_refused(tmp_path, tiny_poison):
    """The clean set was re-made at the same path; --resume mixed old state into new data."""
    clean = tmp_path / "clean"
    prepare(DataConfig(source="synthetic", out=clean, n_train=16, n_test=4, image_size=64))
    cfg = PoisonConfig(clean=clean, out=tmp_path / "out", private=tmp_path / "priv", **tiny_poison)

    class Killed(Exception):
        pass

    def kill(r, stats):
        raise Killed

    with pytest.raises(Killed):
        poison(cfg, on_round=kill)
    assert (work_dir(cfg) / CKPT).exists()
    prepare(DataConfig(source="synthetic", out=clean, n_train=16, n_test=4, image_size=64, seed=1))
    with pytest.raises(ConfigError, match="another version"):
        poison(cfg, resume=True)
    assert not (cfg.out / "manifest.json").exists()


def test_second_writer_on_the_same_out_is_refused(clean, tmp_path, capsys):
    """Two `mme poison` runs on one --out deleted each other's work folder."""
    out, priv = tmp_path / "out", tmp_path / "priv"
    with fsio.locked(out):  # the first run, still going
        argv = ["poison", "--clean", str(clean), "--out", str(out), "--private", str(priv)]
        assert cli.main(argv) == 2
    assert "being written by another process" in capsys.readouterr().err
    assert not out.exists() and not priv.exists()


def test_second_writer_in_another_process_is_refused(tmp_path):
    out = tmp_path / "out"
    code = "import sys; from mme import fsio\nwith fsio.locked(sys.argv[1]): print('got it')"
    with fsio.locked(out):
        done = subprocess.run(
            [sys.executable, "-c", code, str(out)], capture_output=True, text=True
        )
    assert done.returncode != 0 and "FolderBusy" in done.stderr and "got it" not in done.stdout
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert done.stdout.strip() == "got it"


def test_set_failing_verification_has_no_manifest(clean, tmp_path, monkeypatch, tiny_poison):
    """The manifest was written before verify ran: a failed set still looked complete."""
    from mme.protection import verify as verify_module

    real = verify_module.verify

    def failing(*args, **kw):
        report = real(*args, **kw)
        report.errors.append("injected failure")
        return report

    monkeypatch.setattr(verify_module, "verify", failing)
    cfg = PoisonConfig(clean=clean, out=tmp_path / "out", private=tmp_path / "priv", **tiny_poison)
    with pytest.raises(RuntimeError, match="failed verification"):
        poison(cfg)
    assert not (cfg.out / "manifest.json").exists()


@pytest.mark.parametrize("where", ["inside_clean", "private_is_out", "out_inside_private"])
def test_poison_output_overlapping_an_input_is_refused(clean, tmp_path, where, tiny_poison):
    out, priv = {
        "inside_clean": (clean / "pub", tmp_path / "priv"),
        "private_is_out": (tmp_path / "same", tmp_path / "same"),
        "out_inside_private": (tmp_path / "priv" / "pub", tmp_path / "priv"),
    }[where]
    before = files_under(clean)
    with pytest.raises(ConfigError, match="poison"):
        poison(PoisonConfig(clean=clean, out=out, private=priv, **tiny_poison))
    assert files_under(clean) == before and not out.exists()


def test_poison_onto_a_folder_it_did_not_make_is_refused(clean, tmp_path, tiny_poison):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"my own archive")
    with pytest.raises(ConfigError, match="not made by `mme poison`"):
        poison(PoisonConfig(clean=clean, out=out, private=tmp_path / "priv", **tiny_poison))
    assert (out / "train-000000.tar").read_bytes() == b"my own archive"


# ---------------------------------------------------------------------- hostile input to prepare


def folder_corpus(root: Path) -> Path:
    root.mkdir()
    (root / "good.png").write_bytes(png((10, 200, 10)))
    (root / "good.txt").write_text("a green square\n")
    return root


def prepare_folder(src: Path, out: Path) -> dict:
    return prepare(DataConfig(source="folder", input=src, out=out, test_fraction=0.0))


def test_symlinked_caption_file_leaks_no_secret(tmp_path):
    secret = tmp_path / "passwords"
    secret.write_text("root:hunter2\n")
    src = folder_corpus(tmp_path / "src")
    (src / "cat.png").write_bytes(png((1, 2, 3)))
    (src / "cat.txt").symlink_to(secret)
    manifest = prepare_folder(src, tmp_path / "out")
    assert manifest["skipped_counts"] == {"not_regular_file": 1}
    for tar in (tmp_path / "out").glob("*.tar"):
        assert b"hunter2" not in tar.read_bytes()
    assert "hunter2" not in (tmp_path / "out" / "manifest.json").read_text()


def test_symlinked_image_outside_root_is_not_followed(tmp_path):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(png((9, 9, 9)))
    src = folder_corpus(tmp_path / "src")
    (src / "link.png").symlink_to(outside)
    (src / "link.txt").write_text("a caption\n")
    (src / "dir").symlink_to(tmp_path, target_is_directory=True)  # not walked into
    manifest = prepare_folder(src, tmp_path / "out")
    assert manifest["skipped_counts"] == {"not_regular_file": 1}
    assert manifest["splits"]["train"]["images"] == 1


@pytest.fixture
def alarm():
    """Fail (SIGALRM) instead of hanging the suite if a read blocks."""
    signal.alarm(60)
    yield
    signal.alarm(0)


def test_fifo_named_png_does_not_hang(tmp_path, alarm):
    src = folder_corpus(tmp_path / "src")
    os.mkfifo(src / "pipe.png")
    (src / "pipe.txt").write_text("a caption\n")
    os.mkfifo(src / "good2.txt")  # a FIFO as a caption file, too
    (src / "good2.png").write_bytes(png((100, 100, 1)))
    manifest = prepare_folder(src, tmp_path / "out")
    assert manifest["skipped_counts"] == {"not_regular_file": 2}


def test_dev_zero_behind_symlink_does_not_exhaust_memory(tmp_path):
    src = folder_corpus(tmp_path / "src")
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "zero.txt").write_text("endless\n")
    manifest = prepare_folder(src, tmp_path / "out")
    assert manifest["skipped_counts"] == {"not_regular_file": 1}


def test_oversized_image_file_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 1000)
    src = folder_corpus(tmp_path / "src")
    (src / "huge.png").write_bytes(png((5, 5, 5), size=400) + b"\0" * 2000)
    (src / "huge.txt").write_text("big\n")
    manifest = prepare_folder(src, tmp_path / "out")
    assert manifest["skipped_counts"] == {"too_large": 1}


def test_gzip_bomb_named_tar_is_refused_not_inflated(tmp_path, capsys):
    """1.5 MB of gzip named .tar was inflated whole: 1.5 GB of memory."""
    src = tmp_path / "wds"
    src.mkdir()
    raw = io.BytesIO()
    tar_of(tmp_path / "inner.tar", {"k.png": png(), "k.txt": b"cap"})
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz:
        gz.write((tmp_path / "inner.tar").read_bytes())
    (src / "data.tar").write_bytes(raw.getvalue())
    argv = ["prepare", "--source", "webdataset", "--input", str(src), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "not an uncompressed tar" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_oversized_tar_member_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 5000)
    src = tmp_path / "wds"
    src.mkdir()
    members = {"ok.png": png(), "ok.txt": b"fine", "big.png": b"\0" * 6000, "big.txt": b"cap"}
    tar_of(src / "a.tar", members)
    manifest = prepare(DataConfig(source="webdataset", input=src, out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"too_large": 1}
    assert manifest["splits"]["train"]["images"] == 1


def test_non_utf8_file_names_are_counted_not_crashing(tmp_path):
    src = folder_corpus(tmp_path / "src")
    bad = os.fsencode(src) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        f.write(png((50, 60, 70)))
    with open(bad[:-4] + b".txt", "wb") as f:
        f.write(b"a cafe\n")
    manifest = prepare_folder(src, tmp_path / "out")
    assert manifest["skipped_counts"] == {"invalid_name": 1}
    json.dumps(manifest, ensure_ascii=False).encode("utf-8")  # the manifest stays valid UTF-8


def test_non_utf8_tar_member_names_are_counted_not_crashing(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "a.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in {
            "ok.png": png(),
            "ok.txt": b"fine",
            "caf\xe9.png": png((1, 1, 1)),
            "caf\xe9.txt": b"x",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = prepare(DataConfig(source="webdataset", input=src, out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"invalid_name": 1}


def test_non_utf8_csv_cells_are_counted_not_crashing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    rows = b"images,caption\na.png,a red square\na.png,caf\xe9\n" + b"missing_\xe9.png,x\n"
    (src / "c.csv").write_bytes(rows)
    manifest = prepare(DataConfig(source="csv", csv=src / "c.csv", out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"invalid_name": 1, "invalid_utf8": 1}


def test_csv_field_over_128_kib_does_not_crash(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "b.png").write_bytes(png((1, 200, 1)))
    long = "word " * 40_000  # 200 KB, over Python's default csv field limit
    (src / "c.csv").write_text(f'images,caption\na.png,"{long}"\na.png,short one\nb.png,fine\n')
    manifest = prepare(DataConfig(source="csv", csv=src / "c.csv", out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"caption_too_long": 1}
    assert manifest["splits"]["train"]["images"] + manifest["splits"]["test"]["images"] == 2


def test_csv_field_over_the_cap_fails_with_its_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(limits, "MAX_CSV_FIELD", 1000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "c.csv").write_text("images,caption\na.png,ok\nb.png," + "x" * 2000 + "\n")
    argv = ["prepare", "--source", "csv", "--csv", str(src / "c.csv"), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "line 3:" in capsys.readouterr().err


def test_five_megabyte_caption_is_dropped(tmp_path):
    """A 5 MB caption was kept as it is. In a shard it is dropped (the image keeps its other
    captions); as a folder-source caption file it is over that file's cap."""
    src = tmp_path / "wds"
    src.mkdir()
    caps = ("blah " * 1_000_000 + "\nshort caption").encode()
    tar_of(src / "a.tar", {"long.png": png((3, 3, 200)), "long.txt": caps})
    manifest = prepare(DataConfig(source="webdataset", input=src, out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"caption_too_long": 1}
    kept = {s.id: s.captions for s in shards.iter_samples(tmp_path / "o", "train")}
    assert kept["long"] == ["short caption"]
    folder = folder_corpus(tmp_path / "src")
    (folder / "long.png").write_bytes(png((3, 3, 200)))
    (folder / "long.txt").write_bytes(caps)
    assert prepare_folder(folder, tmp_path / "out")["skipped_counts"] == {"too_large": 1}


def test_caption_file_bigger_than_its_cap_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_CAPTION_FILE_BYTES", 100)
    src = folder_corpus(tmp_path / "src")
    (src / "x.png").write_bytes(png((7, 7, 7)))
    (src / "x.txt").write_text("y" * 200)
    assert prepare_folder(src, tmp_path / "out")["skipped_counts"] == {"too_large": 1}


# ----------------------------------------------------------------------- crafted mme shard sets


@pytest.mark.parametrize(
    "name",
    ["../escape.png", "/abs/path.png", "dir/key.png", "bad key.png", "noext"],
)
def test_crafted_member_name_in_a_shard_is_refused(tmp_path, name):
    tar_of(tmp_path / "train-000000.tar", {name: png(), "ok.txt": b"x"})
    with pytest.raises(shards.BadShard):
        list(shards.iter_samples(tmp_path, "train"))


def test_crafted_shard_member_over_the_cap_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 100)
    tar_of(tmp_path / "train-000000.tar", {"k.png": b"\0" * 200, "k.txt": b"x"})
    with pytest.raises(shards.BadShard, match="cap"):
        list(shards.iter_samples(tmp_path, "train"))


def test_fifo_named_as_a_shard_does_not_hang(tmp_path, alarm):
    os.mkfifo(tmp_path / "train-000000.tar")
    with pytest.raises(shards.BadShard, match="not a regular file"):
        list(shards.iter_samples(tmp_path, "train"))


def test_shard_with_broken_utf8_captions_is_a_clear_error(tmp_path):
    tar_of(tmp_path / "train-000000.tar", {"k.png": png(), "k.txt": b"\xff\xfe"})
    with pytest.raises(shards.BadShard, match="sample k"):
        list(shards.iter_samples(tmp_path, "train"))


# ------------------------------------------------------------------------------- nothing lost


def test_hand_rolled_atomic_writes_are_gone():
    """One atomic-write helper: no module of mme renames a temporary file into place itself."""
    root = Path(__file__).resolve().parents[1] / "mme"
    offenders = [
        p.name
        for p in root.rglob("*.py")
        if p.name != "fsio.py"
        and any(t in p.read_text() for t in ("os.replace(", ".partial", "tmp.replace("))
    ]
    assert offenders == []


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    fsio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), fsio.atomic_open(target) as f:
        f.write(b"half")
        raise RuntimeError
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_checkpoint_holds_tensors_and_plain_data_only(clean, tmp_path, tiny_poison):
    cfg = PoisonConfig(clean=clean, out=tmp_path / "out", private=tmp_path / "priv", **tiny_poison)

    def stop(r, stats):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        poison(cfg, on_round=stop)
    ckpt = torch.load(work_dir(cfg) / CKPT, weights_only=True)
    assert ckpt["clean_manifest_sha256"] == shards.manifest_sha256(clean)
    poison(cfg, resume=True)  # and a genuine checkpoint still resumes
    assert (cfg.out / "manifest.json").exists() and not work_dir(cfg).exists()


# ------------------------------------------------------------------------------------ telemetry


def test_flow_entry_point_outside_make_phones_no_home():
    """`python -m flows.reevaluate` (documented in the README) ran with analytics on."""
    env = {k: v for k, v in os.environ.items() if "TELEMETRY" not in k and "ANALYTICS" not in k}
    env.pop("DO_NOT_TRACK", None)
    code = (
        "import os, flows.reevaluate\n"  # the README's `python -m flows.reevaluate`
        "from prefect.settings import get_current_settings\n"
        "s = get_current_settings()\n"
        "assert s.server.analytics_enabled is False, 'server analytics on'\n"
        "assert s.cloud.enable_orchestration_telemetry is False, 'orchestration telemetry on'\n"
        "assert os.environ['MLFLOW_DISABLE_TELEMETRY'] == 'true'\n"
        "assert os.environ['DO_NOT_TRACK'] == '1'\n"
        "import flows.serve\n"  # the server entry point: nothing it imports turns it back on
        "assert get_current_settings().server.analytics_enabled is False\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_planted_prefect_result_runs_no_code(tmp_path):
    """Cached task results are read back from disk: they must be JSON, not pickles."""
    from flows import tasks
    from flows.results import PlainJSON, PlainRecordsOnly

    for task in (tasks.prepare_task, tasks.poison_task, tasks.train_task, tasks.evaluate_task):
        assert isinstance(task.result_serializer, PlainJSON)  # plain JSON types and paths only
        assert isinstance(task.cache_policy, PlainRecordsOnly)  # only such records are read
    ser = PlainJSON()
    assert ser.loads(ser.dumps(Path("a/b"))) == Path("a/b")
    assert ser.loads(ser.dumps({"i2t_r1": 1.5})) == {"i2t_r1": 1.5}
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
        ser.loads(pickle.dumps(Payload()))
    assert not marker.exists()


def test_rerun_over_old_layout_removes_private_files_from_public_folder(
    clean, tmp_path, tiny_poison
):
    """An output made before the split held noise.npy and grid.png beside the shards: a new run
    over it must not leave them in the folder that gets published."""
    out = tmp_path / "out"
    out.mkdir()
    shards.write_json_atomic(out / "manifest.json", {"created_by": "mme poison"})
    for name in ("noise.npy", "triggers.json", "grid.png"):
        (out / name).write_bytes(b"old private data")
    poison(PoisonConfig(clean=clean, out=out, private=tmp_path / "priv", **tiny_poison))
    assert {p.name for p in out.iterdir()} == {fsio.OWNER, "manifest.json", "train-000000.tar"}


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe"])
def test_crafted_manifest_is_a_clear_error(tmp_path, content, capsys):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(shards.BadShard, match="manifest.json"):
        shards.load_manifest(tmp_path)


def test_fifo_as_manifest_does_not_hang(tmp_path, alarm):
    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(shards.BadShard, match="not a regular file"):
        shards.load_manifest(tmp_path)
