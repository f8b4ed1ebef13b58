"""Tests of mme.grid: layout size, noise amplification, determinism, atomic save, loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mme.imageops import apply_noise, to_working_resolution
from mme.protection.grid import (
    FONT_SIZE,
    PAD,
    TEXT_WIDTH,
    _font,
    amplify_noise,
    make_grid,
    save_grid,
    wrap_text,
)
from mme.shards import (
    Sample,
    encode_png,
    iter_samples,
    load_manifest,
    write_json_atomic,
    write_shards,
)

EPS = 8


def make_arrays(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    noise = rng.integers(-EPS, EPS + 1, clean.shape).astype(np.int8)
    return clean, apply_noise(clean, noise), noise


@pytest.mark.parametrize(("n", "size", "scale"), [(1, 16, 1), (3, 32, 3), (4, 64, 2)])
def test_grid_size(n, size, scale):
    clean, prot, _ = make_arrays(n, size)
    grid = make_grid(clean, prot, [f"red caption {i}" for i in range(n)], EPS, scale=scale)
    cell = size * scale
    line_h = FONT_SIZE + 4
    rows_h = [max(cell, line_h)] * n  # short captions: one line each
    assert grid.mode == "RGB"
    assert grid.width == PAD + 3 * (cell + PAD) + TEXT_WIDTH + PAD
    assert grid.height == PAD + 2 * line_h + PAD // 2 + sum(h + PAD for h in rows_h)


def test_grid_pixels_are_the_images_upscaled():
    clean, prot, noise = make_arrays(2, 16)
    scale = 3
    grid = np.asarray(make_grid(clean, prot, ["a", "b"], EPS, scale=scale))
    cell = 16 * scale
    top = PAD + 2 * (FONT_SIZE + 4) + PAD // 2
    for col, images in enumerate((clean, None, prot)):
        x = PAD + col * (cell + PAD)
        block = grid[top : top + cell, x : x + cell].transpose(2, 0, 1)
        want = amplify_noise(clean[0], prot[0], EPS) if images is None else images[0]
        assert np.array_equal(block[:, ::scale, ::scale], want)  # NEAREST: each pixel a block
        assert np.array_equal(block[:, scale - 1 :: scale, scale - 1 :: scale], want)


def test_grid_is_deterministic_and_depends_on_input():
    clean, prot, _ = make_arrays(3, 24)
    caps = ["red dog " * 30, "blue", "house"]
    a = make_grid(clean, prot, caps, EPS, title="mem, eps=8/255")
    b = make_grid(clean.copy(), prot.copy(), list(caps), EPS, title="mem, eps=8/255")
    assert a.size == b.size and a.tobytes() == b.tobytes()
    c = make_grid(clean, prot, caps, EPS, title="other")
    assert a.tobytes() != c.tobytes()  # the title is drawn


@pytest.mark.parametrize("eps", [4, 8, 16])
def test_amplify_noise_maps_eps_range(eps):
    clean = np.full((3, 2, 2), 100, np.uint8)
    delta = np.array([-eps, 0, eps, eps // 2]).reshape(1, 2, 2).repeat(3, 0)
    out = amplify_noise(clean, apply_noise(clean, delta), eps)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[0, 0, 1] == 128 and out[0, 1, 0] == 255
    assert amplify_noise(clean, clean, 0).min() == 128  # eps = 0: no noise to show


def test_long_captions_wrap_and_grow_the_row():
    clean, prot, _ = make_arrays(1, 16)
    font = _font()
    text = "a very long protected caption " * 12 + "x" * 200
    lines = wrap_text(text, font, TEXT_WIDTH)
    assert 1 < len(lines) <= 8 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= TEXT_WIDTH for line in lines)
    short = make_grid(clean, prot, ["short"], EPS, scale=1)
    long = make_grid(clean, prot, [text], EPS, scale=1)
    assert long.width == short.width and long.height > short.height


def test_bad_inputs_raise():
    clean, prot, _ = make_arrays(2, 16)
    with pytest.raises(ValueError, match="captions"):
        make_grid(clean, prot, ["only one"], EPS)
    with pytest.raises(ValueError, match="arrays"):
        make_grid(clean, prot[:, :, :8], ["a", "b"], EPS)
    with pytest.raises(ValueError, match="uint8"):
        make_grid(clean, prot.astype(np.int16), ["a", "b"], EPS)


def test_save_grid_writes_png_atomically(tmp_path: Path):
    clean, prot, _ = make_arrays(2, 16)
    path = save_grid(
        tmp_path / "out" / "grid.png", clean, prot, ["a", "b"], EPS, title="mem, eps=8/255"
    )
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == make_grid(clean, prot, ["a", "b"], EPS, title="mem, eps=8/255").size
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def load_examples(
    clean: Path, protected: Path, n: int = 8
) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """The first ``n`` protected train samples with their clean partners, ready for the grid
    (a helper of this test, moved out of mme.protection.grid).

    Returns ``(clean (n,3,S,S) u8, protected (n,3,S,S) u8, first protected caption of each,
    {"method", "epsilon"})``. The clean train split is streamed until every partner is found.
    """
    manifest = load_manifest(protected)
    size, cfg = int(manifest["working_size"]), manifest.get("config", {})
    prot, captions, ids = [], [], []
    for s in iter_samples(protected, "train"):
        if len(ids) == n:
            break
        prot.append(s.image().transpose(2, 0, 1))
        captions.append(s.captions[0] if s.captions else "")
        ids.append(s.id)
    if not ids:
        raise ValueError(f"no protected train samples in {protected}")
    found: dict[str, np.ndarray] = {}
    for s in iter_samples(clean, "train"):
        if s.id in ids:
            found[s.id] = to_working_resolution(s.image_bytes, size)
            if len(found) == len(ids):
                break
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"clean set {clean} lacks protected ids {missing[:5]}")
    info = {"method": cfg.get("method"), "epsilon": cfg.get("epsilon")}
    return np.stack([found[i] for i in ids]), np.stack(prot), captions, info


def test_load_examples(tmp_path: Path):
    size, rng = 16, np.random.default_rng(3)
    clean = [
        Sample(
            f"s{i}", encode_png(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)), "png", [f"c{i}"]
        )
        for i in range(5)
    ]
    write_shards(tmp_path / "C", "train", clean)
    prot = []
    for s in clean[::-1]:  # a different order than the clean set
        px = apply_noise(to_working_resolution(s.image_bytes, size), np.int8(3)).transpose(1, 2, 0)
        prot.append(Sample(s.id, encode_png(px), "png", [f"red {s.captions[0]}", "x"]))
    write_shards(tmp_path / "P", "train", prot)
    cfg = {"method": "mem", "epsilon": 3}
    write_json_atomic(tmp_path / "P" / "manifest.json", {"config": cfg, "working_size": size})
    c, p, caps, info = load_examples(tmp_path / "C", tmp_path / "P", n=3)
    assert c.shape == p.shape == (3, 3, size, size) and caps == ["red c4", "red c3", "red c2"]
    assert info == {"method": "mem", "epsilon": 3}
    assert np.all(p.astype(int) - c.astype(int) <= 3)
    make_grid(c, p, caps, info["epsilon"], title=f"{info['method']}")
