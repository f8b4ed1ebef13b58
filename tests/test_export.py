"""Tests of mme.export: folder / webdataset output, round trip through prepare, no overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mme.cli import main
from mme.protection.export import export
from mme.shards import (
    PRIVATE_META,
    Sample,
    encode_png,
    iter_samples,
    sha256_bytes,
    shard_paths,
    write_json_atomic,
    write_shards,
)

SIZE = 24
EPS = 8


def make_protected(root: Path, n: int = 7, seed: int = 0, old_meta: bool = False) -> list[Sample]:
    """A small protected set in the ``mme poison`` format (shards, manifest, noise.npy, ...);
    ``old_meta``: as sets made before the trigger became private (it named it in the meta)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        png = encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        word = ["red", "dog", "house", "blue"][i % 4]
        caps = [f"{word} a photo number {i}", f"{word} another caption, é ü {i}"]
        meta = {"id": f"img-{i:03d}", "source": "test", "sha256": sha256_bytes(png)}
        meta.update(width=SIZE, height=SIZE, method="mem", epsilon=EPS)
        if old_meta:
            meta.update(protected=True, trigger_text=word, trigger_ids=[1000 + i % 4])
            meta.update(trigger_word=0, clean_sha256="0" * 64)
        samples.append(Sample(meta["id"], png, "png", caps, meta))
    shards = write_shards(root, "train", samples, maxcount=3)
    config = {"method": "mem", "epsilon": EPS, "model": "mme-tiny-vit", "trigger_len": 1}
    if old_meta:
        config["seed"] = 1234
    splits = {"train": {"images": n, "captions": 2 * n, "shards": shards}}
    manifest = {"created_by": "mme poison", "config": config, "clean": "/somewhere/clean"}
    write_json_atomic(root / "manifest.json", {**manifest, "working_size": SIZE, "splits": splits})
    np.save(root / "noise.npy", np.zeros((n, 3, SIZE, SIZE), np.int8))
    write_json_atomic(root / "triggers.json", {"ids": [], "trigger_ids": [], "trigger_text": []})
    return samples


@pytest.fixture
def protected(tmp_path: Path) -> tuple[Path, list[Sample]]:
    root = tmp_path / "P"
    return root, make_protected(root)


def run_export(prot: Path, out: Path, *extra: str) -> int:
    return main(["export", "--protected", str(prot), "--out", str(out), *extra])


def test_folder_files(protected, tmp_path):
    prot, samples = protected
    out = tmp_path / "pub"
    assert run_export(prot, out) == 0
    for s in samples:
        assert (out / f"{s.id}.png").read_bytes() == s.image_bytes
        assert (out / f"{s.id}.txt").read_text("utf-8").splitlines() == s.captions
    lines = (out / "metadata.jsonl").read_text("utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [s.id for s in samples]
    assert all(r["epsilon"] == EPS and r["method"] == "mem" for r in records)
    assert records[0]["file"] == f"{samples[0].id}.png"
    readme = (out / "README.txt").read_text()
    assert "method: mem" in readme and f"epsilon: {EPS}" in readme
    # the noise would undo the protection: it must never be published
    assert not (out / "noise.npy").exists() and not (out / "triggers.json").exists()
    assert not out.with_name("pub.partial").exists()


def test_folder_round_trip_through_prepare(protected, tmp_path):
    prot, samples = protected
    out = tmp_path / "pub"
    assert run_export(prot, out) == 0
    back = tmp_path / "back"
    args = ["prepare", "--params", "none", "--source", "folder"]
    assert main([*args, "--input", str(out), "--out", str(back)]) == 0
    read = {s.id: s for s in iter_samples(back, "train")}
    assert sorted(read) == sorted(s.id for s in samples)
    for s in samples:
        assert read[s.id].captions == s.captions
        assert np.array_equal(read[s.id].image(), s.image())


def test_webdataset_copies_shards(protected, tmp_path):
    prot, samples = protected
    out = tmp_path / "wds"
    assert run_export(prot, out, "--format", "webdataset") == 0
    names = [p.name for p in shard_paths(prot, "train")]
    assert [p.name for p in shard_paths(out, "train")] == names
    for name in names:
        assert (out / name).read_bytes() == (prot / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["epsilon"] == EPS and "clean" not in manifest
    assert [s.id for s in iter_samples(out, "train")] == [s.id for s in samples]
    assert not (out / "noise.npy").exists()


def test_old_set_naming_its_trigger_is_exported_without_it(tmp_path, capsys):
    """A set made before the trigger left the public meta: the folder export drops those keys
    (and the seed); the webdataset export, which copies shards byte for byte, refuses it."""
    prot = tmp_path / "old"
    make_protected(prot, old_meta=True)
    assert run_export(prot, tmp_path / "pub") == 0
    text = (tmp_path / "pub" / "metadata.jsonl").read_text("utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert all(not set(PRIVATE_META) & set(r) for r in records)
    assert run_export(prot, tmp_path / "wds", "--format", "webdataset") == 2
    assert "trigger_text" in capsys.readouterr().err and not (tmp_path / "wds").exists()
    make_protected(tmp_path / "old2", old_meta=False)  # the seed alone: dropped from the config
    manifest = json.loads((tmp_path / "old2" / "manifest.json").read_text())
    manifest["config"]["seed"] = 1234
    (tmp_path / "old2" / "manifest.json").write_text(json.dumps(manifest))
    assert run_export(tmp_path / "old2", tmp_path / "wds2", "--format", "webdataset") == 0
    assert "seed" not in json.loads((tmp_path / "wds2" / "manifest.json").read_text())["config"]


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_refuses_to_overwrite_without_force(protected, tmp_path, capsys, fmt):
    prot, _ = protected
    out = tmp_path / "pub"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_export(prot, out, "--format", fmt) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    # --force replaces an earlier export only, never a folder someone else made
    assert run_export(prot, out, "--format", fmt, "--force") == 2
    assert "not one" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    again = tmp_path / "again"
    assert run_export(prot, again, "--format", fmt) == 0
    (again / "stale.png").write_bytes(b"left from before")
    assert run_export(prot, again, "--format", fmt, "--force") == 0
    assert not (again / "stale.png").exists() and (again / "README.txt").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".again", "again."))]
    assert leftovers == [".again.lock"]  # the lock file stays beside the folder, nothing else


def test_empty_out_dir_is_fine_and_stale_partial_is_replaced(protected, tmp_path):
    prot, samples = protected
    out = tmp_path / "pub"
    out.mkdir()
    stale = tmp_path / ".pub.12345.0badf00d.partial"  # an export killed mid-way
    stale.mkdir()
    (stale / "junk.png").write_bytes(b"not an image")
    result = export(prot, out)
    assert result["splits"]["train"] == {"images": len(samples), "captions": 2 * len(samples)}
    assert not (out / "junk.png").exists() and not stale.exists()


@pytest.mark.parametrize("broken", ["folder", "manifest", "shards"])
def test_missing_input_exits_2(protected, tmp_path, capsys, broken):
    prot, _ = protected
    if broken == "folder":
        prot = tmp_path / "nowhere"
    elif broken == "manifest":
        (prot / "manifest.json").unlink()
    else:
        for tar in shard_paths(prot, "train"):
            tar.unlink()
    assert run_export(prot, tmp_path / "pub") == 2
    assert "mme export:" in capsys.readouterr().err
    assert not (tmp_path / "pub").exists()


def test_deterministic(protected, tmp_path):
    prot, _ = protected
    a, b = tmp_path / "a", tmp_path / "b"
    export(prot, a)
    export(prot, b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_folder_metadata_names_file_name_and_text(protected, tmp_path):
    """What the Hugging Face imagefolder builder reads: file_name (relative) and text."""
    prot, samples = protected
    out = tmp_path / "pub"
    assert run_export(prot, out) == 0
    records = [json.loads(x) for x in (out / "metadata.jsonl").read_text("utf-8").splitlines()]
    for r, s in zip(records, samples, strict=True):
        assert (out / r["file_name"]).read_bytes() == s.image_bytes
        assert r["text"] == s.captions[0] and r["captions"] == s.captions


def test_folder_export_loads_with_hf_imagefolder(protected, tmp_path):
    """Runs only where `datasets` is installed (it is not in the lock: see the report)."""
    datasets = pytest.importorskip("datasets")
    prot, samples = protected
    out = tmp_path / "pub"
    assert run_export(prot, out) == 0
    ds = datasets.load_dataset("imagefolder", data_dir=str(out))["train"]
    assert sorted(ds["text"]) == sorted(s.captions[0] for s in samples)
    assert ds[0]["image"].size == (SIZE, SIZE)
