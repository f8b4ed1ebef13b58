"""`mme prepare` on corpora built inside the tests: round trip, determinism, bad input, strict."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mme import cli, shards
from mme.config import DataConfig
from mme.ingest.prepare import hash_split, prepare

FLICKR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flickr8k-dev"


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_item(root: Path, name: str, data: bytes, captions: bytes | None) -> None:
    (root / name).write_bytes(data)
    if captions is not None:
        (root / name).with_suffix(".txt").write_bytes(captions)


@pytest.fixture()
def bad_corpus(tmp_path: Path) -> Path:
    """A folder corpus with one good image per convertible mode and one item per failure."""
    root = tmp_path / "corpus"
    root.mkdir()
    good = png_bytes(rgb(0))
    write_item(root, "good.png", good, b"a good image\nanother caption\n")
    write_item(root, "dup.png", good, b"same pixels again")  # duplicate_image
    write_item(root, "grey.png", png_bytes(rgb(1)[..., 0], "L"), b"a grey image")
    rgba = np.dstack([rgb(2), np.full((32, 32), 128, np.uint8)])
    write_item(root, "alpha.png", png_bytes(rgba, "RGBA"), b"an image with alpha")
    write_item(root, "trunc.png", png_bytes(rgb(3))[:200], b"cut in half")
    write_item(root, "garbage.jpg", b"not an image at all", b"garbage bytes")
    write_item(root, "tiny.png", png_bytes(rgb(4, size=8)), b"too small")
    write_item(root, "nocap.png", png_bytes(rgb(5)), b"   \n\t\n")  # only empty captions
    write_item(root, "latin1.png", png_bytes(rgb(6)), b"caf\xe9 ok?\nvalid caption")
    write_item(root, "notxt.png", png_bytes(rgb(7)), None)
    big = Image.new("1", (3000, 3000))  # 9 Mpx: above the limit set below, tiny on disk
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    write_item(root, "bomb.png", buf.getvalue(), b"a decompression bomb")
    return root


def test_synthetic_round_trip_with_webdataset(tmp_path):
    cfg = DataConfig(source="synthetic", out=tmp_path, n_train=12, n_test=5, shard_size=5)
    manifest = prepare(cfg)
    assert manifest["splits"]["train"]["images"] == 12
    assert manifest["splits"]["test"]["captions"] == 25
    assert [r["count"] for r in manifest["splits"]["train"]["shards"]] == [5, 5, 2]
    ours = list(shards.iter_samples(tmp_path, "train"))
    ds = wds.WebDataset(shards.brace_pattern(tmp_path, "train"), shardshuffle=False)
    theirs = list(ds.decode("rgb8"))
    assert [s["__key__"] for s in theirs] == [s.id for s in ours]
    for mine, other in zip(ours, theirs, strict=True):
        assert other["txt"].split("\n") == mine.captions and len(mine.captions) == 5
        assert np.array_equal(other["png"], mine.image())
        assert other["json"]["sha256"] == shards.sha256_bytes(mine.image_bytes)


def test_same_inputs_give_byte_identical_shards(tmp_path, bad_corpus):
    for source, kw in (("synthetic", {"n_train": 6, "n_test": 2}), ("folder", {})):
        a, b = tmp_path / f"{source}-a", tmp_path / f"{source}-b"
        for out in (a, b):
            prepare(DataConfig(source=source, out=out, input=bad_corpus, **kw))
        names = sorted(p.name for p in a.glob("*.tar"))
        assert names and names == sorted(p.name for p in b.glob("*.tar"))
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
        ma["config"].pop("out"), mb["config"].pop("out")  # the only intended difference
        assert ma == mb


def test_bad_input_is_skipped_and_counted(tmp_path, bad_corpus, capsys):
    before = {p.name: p.read_bytes() for p in bad_corpus.iterdir()}
    out = tmp_path / "out"  # beside the input, not around it
    argv = ["prepare", "--source", "folder", "--input", str(bad_corpus), "--out", str(out)]
    assert cli.main([*argv, "--max-pixels", "4000000", "--test-fraction", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["skipped_counts"]
    assert counts == {
        "decompression_bomb": 1,
        "duplicate_image": 1,
        "empty_caption": 2,
        "invalid_utf8": 1,
        "no_valid_captions": 2,
        "too_small": 1,
        "truncated_image": 1,
        "unreadable_image": 1,
    }
    kept = {s.id: s for s in shards.iter_samples(out, "train")}
    assert sorted(kept) == ["alpha", "dup", "grey", "latin1"]  # files are read in name order
    assert kept["latin1"].captions == ["valid caption"]
    assert kept["grey"].meta["converted_from"] == "L"
    assert "skipped: decompression_bomb 1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in bad_corpus.iterdir()} == before  # input untouched


def test_strict_turns_skips_into_an_error(tmp_path, bad_corpus, capsys):
    out = tmp_path / "out"
    argv = ["prepare", "--source", "folder", "--input", str(bad_corpus), "--out", str(out)]
    assert cli.main([*argv, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "truncated_image: trunc" in err and "--strict" in err


def test_csv_source_split_and_image_root(tmp_path):
    src = tmp_path / "src"  # the image root; the output goes beside it, never inside
    images = src / "imgs"
    images.mkdir(parents=True)
    rows = ["image,caption_number,caption,id,images"]
    for i in range(10):
        (images / f"p{i}.png").write_bytes(png_bytes(rgb(10 + i)))
        for j in range(3):
            rows.append(f"p{i}.png,{j},photo {i} caption {j},{i},/elsewhere/imgs/p{i}.png")
    csv = src / "captions.csv"
    csv.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source="csv", csv=csv, image_root=src, out=tmp_path / "o")
    cfg.test_fraction = 0.3
    manifest = prepare(cfg)
    n_test = manifest["splits"]["test"]["images"]
    assert manifest["splits"]["train"]["images"] + n_test == 10
    assert n_test == sum(hash_split(f"p{i}", 0.3) == "test" for i in range(10))
    for split in ("train", "test"):
        for s in shards.iter_samples(tmp_path / "o", split) if split == "train" or n_test else []:
            assert len(s.captions) == 3 and hash_split(s.id, 0.3) == split


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_hash_split_is_stable_and_proportional(fraction):
    ids = [f"img{i}" for i in range(2000)]
    first = [hash_split(i, fraction) for i in ids]
    assert first == [hash_split(i, fraction) for i in ids]
    share = first.count("test") / len(ids)
    assert abs(share - fraction) < 0.04


@pytest.mark.skipif(not FLICKR.exists(), reason="shared Flickr8k dev set not present")
def test_flickr8k_dev_csv(tmp_path):
    cfg = DataConfig(
        source="csv", csv=FLICKR / "captions.csv", image_root=FLICKR, out=tmp_path, max_side=64
    )
    manifest = prepare(cfg)
    assert manifest["splits"]["train"] | {"shards": None} == {
        "images": 1000,
        "captions": 5000,
        "shards": None,
    }
    assert manifest["skipped"] == []
