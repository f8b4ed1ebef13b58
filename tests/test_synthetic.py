"""Tests of mme.synthetic: determinism, independence, sizes, scenes, captions, shard round trip."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from mme.ingest import synthetic
from mme.ingest.synthetic import (
    BG_COLOURS,
    COLOUR_WORDS,
    COLOURS,
    MAX_WORDS,
    MIN_CONTRAST,
    POSITIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZES,
    TEXTURES,
    generate,
    make_sample,
)
from mme.shards import iter_samples, sha256_bytes, write_shards


def _mentions(text: str, phrases: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text) for p in phrases)


@pytest.fixture(scope="module")
def train_200() -> list:
    return list(generate("train", 200))


@pytest.mark.parametrize("seed", [0, 7])
def test_same_arguments_give_identical_samples(seed: int) -> None:
    first = list(generate("train", 6, seed=seed))
    second = list(generate("train", 6, seed=seed))
    assert [s.image_bytes for s in first] == [s.image_bytes for s in second]
    assert [s.captions for s in first] == [s.captions for s in second]
    assert [s.meta for s in first] == [s.meta for s in second]


def test_different_seeds_differ() -> None:
    a = list(generate("train", 6, seed=0))
    b = list(generate("train", 6, seed=1))
    assert all(x.image_bytes != y.image_bytes for x, y in zip(a, b, strict=True))


def test_splits_differ_and_ids() -> None:
    train = list(generate("train", 5))
    test = list(generate("test", 5))
    assert [s.id for s in train] == [f"syn-train-{i:06d}" for i in range(5)]
    assert [s.id for s in test] == [f"syn-test-{i:06d}" for i in range(5)]
    assert not {s.meta["sha256"] for s in train} & {s.meta["sha256"] for s in test}


@pytest.mark.parametrize("k", [1, 4, 9])
def test_images_do_not_depend_on_n(k: int) -> None:
    short = list(generate("test", k))
    long = list(generate("test", 2 * k))
    assert [s.image_bytes for s in short] == [s.image_bytes for s in long[:k]]
    assert [s.captions for s in short] == [s.captions for s in long[:k]]


def test_make_sample_matches_generate() -> None:
    samples = list(generate("train", 5, seed=3))
    assert make_sample("train", 4, seed=3).image_bytes == samples[4].image_bytes


def test_scene_does_not_depend_on_size_or_caption_count() -> None:
    a = make_sample("train", 11, image_size=32, captions_per_image=1)
    b = make_sample("train", 11, image_size=96, captions_per_image=7)
    assert a.meta["scene"] == b.meta["scene"]


@pytest.mark.parametrize("size", [32, 48, 64, 100, 128, 256])
def test_sizes_and_meta(size: int) -> None:
    for sample in generate("train", 2, image_size=size):
        pixels = sample.image()
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
        assert pixels.std() > 5  # a real picture, not a flat fill
        assert sample.image_ext == "png"
        assert sample.meta["sha256"] == sha256_bytes(sample.image_bytes)
        assert (sample.meta["width"], sample.meta["height"]) == (size, size)
        assert sample.meta["id"] == sample.id and sample.meta["source"] == "synthetic"
        json.dumps(sample.meta)  # stored as the shard's .json member


def test_scenes_are_valid(train_200: list) -> None:
    counts = set()
    for sample in train_200:
        scene = sample.meta["scene"]
        objects = scene["objects"]
        counts.add(len(objects))
        assert scene["background"]["texture"] in TEXTURES
        bg = scene["background"]["colour"]
        assert bg in BG_COLOURS
        assert len({o["position"] for o in objects}) == len(objects)  # one object per cell
        for obj in objects:
            assert obj["shape"] in SHAPES and obj["size"] in SIZES
            assert obj["colour"] in COLOURS and obj["position"] in POSITIONS
            contrast = np.linalg.norm(np.subtract(COLOURS[obj["colour"]], BG_COLOURS[bg]))
            assert contrast >= MIN_CONTRAST  # visible, so the caption is truthful
    assert counts == {1, 2, 3}


def test_scene_vocabulary_is_used(train_200: list) -> None:
    mains = [s.meta["scene"]["objects"][0] for s in train_200]
    assert {o["shape"] for o in mains} == set(SHAPES)
    assert {o["colour"] for o in mains} == set(COLOURS)
    assert {o["position"] for o in mains} == set(POSITIONS)
    assert {s.meta["scene"]["background"]["texture"] for s in train_200} == set(TEXTURES)


@pytest.mark.parametrize("count", [1, 5, 8])
def test_caption_format(count: int) -> None:
    for sample in generate("train", 60, captions_per_image=count):
        assert len(sample.captions) == count
        assert len(set(sample.captions)) == count  # distinct paraphrases
        for cap in sample.captions:
            assert cap.isascii() and cap == cap.lower() and cap == cap.strip()
            assert "\n" not in cap and "\r" not in cap and "  " not in cap
            assert 2 <= len(cap.split()) <= MAX_WORDS


def test_captions_name_main_object(train_200: list) -> None:
    for sample in train_200:
        main = sample.meta["scene"]["objects"][0]
        for cap in sample.captions:
            assert _mentions(cap, SHAPE_WORDS[main["shape"]]), (cap, main)
            assert _mentions(cap, COLOUR_WORDS[main["colour"]]), (cap, main)


def test_captions_are_paraphrased(train_200: list) -> None:
    # Different templates: an image's captions nearly always open with different word pairs, and
    # across the set many distinct openings are used.
    openings = [tuple(c.split()[:3]) for s in train_200 for c in s.captions]
    assert len(set(openings)) > 100
    assert sum(len({tuple(c.split()[:2]) for c in s.captions}) >= 4 for s in train_200) > 190
    lengths = [len(c.split()) for s in train_200 for c in s.captions]
    assert min(lengths) <= 8 and max(lengths) >= 18  # short and detailed ones
    # Some captions mention the background, some do not.
    with_bg = sum(_mentions(c, ("background", "backdrop")) for s in train_200 for c in s.captions)
    assert 0.3 < with_bg / (5 * len(train_200)) < 0.9


def test_captions_identify_images(train_200: list) -> None:
    # Main shape + colour + position + background: few images share one combination.
    keys = []
    for s in train_200:
        o, bg = s.meta["scene"]["objects"][0], s.meta["scene"]["background"]
        keys.append((o["shape"], o["colour"], o["position"], bg["texture"], bg["colour"]))
    assert len(set(keys)) > 0.95 * len(keys)


@pytest.mark.parametrize("shape", ["circle", "square", "diamond"])
@pytest.mark.parametrize("colour", ["red", "yellow", "white"])
def test_main_object_is_drawn_in_its_colour(shape: str, colour: str) -> None:
    scene = {
        "background": {"texture": "plain", "colour": "navy"},
        "objects": [{"shape": shape, "colour": colour, "size": "large", "position": "centre"}],
    }
    pixels = synthetic.render(scene, 64, np.random.default_rng(0)).astype(float)
    centre = pixels[30:34, 30:34].reshape(-1, 3).mean(axis=0)
    corner = pixels[:6, :6].reshape(-1, 3).mean(axis=0)
    target, navy = np.array(COLOURS[colour]), np.array(BG_COLOURS["navy"])
    assert np.linalg.norm(centre - target) < np.linalg.norm(centre - navy)
    assert np.linalg.norm(corner - navy) < np.linalg.norm(corner - target)


def test_shard_round_trip(tmp_path) -> None:
    samples = list(generate("test", 7))
    write_shards(tmp_path, "test", samples, maxcount=3)
    back = list(iter_samples(tmp_path, "test"))
    assert [s.id for s in back] == [s.id for s in samples]
    assert [s.image_bytes for s in back] == [s.image_bytes for s in samples]
    assert [s.captions for s in back] == [s.captions for s in samples]
    assert [s.meta for s in back] == [s.meta for s in samples]


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    list(generate("train", 100))
    # ~5 ms per 64 px image on one core; the bound leaves room for a loaded CI machine.
    assert time.perf_counter() - start < 6.0


@pytest.mark.parametrize(
    "kwargs",
    [{"n": -1}, {"n": 1, "seed": -1}, {"n": 1, "image_size": 4}, {"n": 1, "captions_per_image": 0}],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        list(generate("train", **kwargs))
