"""Protection at native resolution (:mod:`mme.protection.native`): mapping δ onto the original
pixels (pure functions), and the acceptance run: an 800x600 photo -> prepare -> poison -> export
--native gives an 800x600 image that ``mme verify --native`` passes at that size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mme import cli, imageops, shards
from mme.protection import native


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth 'photo' with some texture, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 180 // width, y * 180 // height, (x + y) * 90 // (width + height)], -1)
    texture = (20 * np.sin(x / 7.0) * np.cos(y / 11.0))[..., None]
    return np.clip(base + 40 + texture + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    return shards.encode_png(pixels)


def delta(size: int = 64, eps: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-eps, eps + 1, (3, size, size)).astype(np.int8)


@pytest.mark.parametrize(("w", "h", "size"), [(800, 600, 64), (600, 800, 64), (64, 64, 64),
                                              (333, 500, 224), (40, 30, 64)])  # fmt: skip
def test_geometry_is_the_working_crop(w: int, h: int, size: int) -> None:
    """The mapped crop box lands where to_working_resolution takes its crop from."""
    sx, sy, left, top = native.working_geometry(w, h, size)
    assert left + size <= round(w * sx) and top + size <= round(h * sy)
    if (w, h) != (size, size):
        assert min(round(w * sx), round(h * sy)) == size


def test_identity_at_working_size() -> None:
    d = delta()
    assert np.array_equal(native.native_noise(d, 64, 64, 8), d)


@pytest.mark.parametrize(("w", "h"), [(800, 600), (123, 457), (50, 40)])
@pytest.mark.parametrize("eps", [8, 4])
def test_native_noise_respects_the_bound(w: int, h: int, eps: int) -> None:
    out = native.native_noise(delta(eps=eps), w, h, eps)
    assert out.shape == (3, h, w) and np.abs(out).max() <= eps
    assert (out != 0).mean() > 0.5  # the margins outside the crop carry noise too
    clean = photo(w, h)
    prot = native.protect_native(clean, delta(eps=eps), eps)
    assert prot.shape == clean.shape and np.abs(prot.astype(int) - clean).max() <= eps


def test_bands_do_not_change_the_result(monkeypatch) -> None:
    whole = native.native_noise(delta(), 300, 250, 8)
    monkeypatch.setattr(native, "BAND_ROWS", 7)
    assert np.array_equal(native.native_noise(delta(), 300, 250, 8), whole)


def test_victim_resize_sees_delta_again() -> None:
    """Back at the working size (the victim's resize + crop), the native noise correlates with
    δ: the mapping carries the optimised pattern, not just any noise."""
    clean, d = photo(800, 600), delta()
    prot = native.protect_native(clean, d, 8)
    seen = imageops.to_working_resolution(png(prot), 64).astype(int)
    seen -= imageops.to_working_resolution(png(clean), 64)
    assert np.corrcoef(seen.ravel(), d.ravel().astype(int))[0, 1] > 0.9


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder source: an 800x600 photo, a portrait one and a square one, with captions."""
    src = tmp_path / "photos"
    src.mkdir()
    for name, (w, h) in {"big": (800, 600), "tall": (300, 450), "square": (64, 64)}.items():
        Image.fromarray(photo(w, h, seed=w)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a {name} photo of stripes\nstripes in a {name} frame\n")
    return src


def test_export_native_800x600_passes_verify(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MME_TRACKING", "off")
    none = ["--params", "none"]
    clean, prot, out = tmp_path / "clean", tmp_path / "prot", tmp_path / "publish"
    private = tmp_path / "private"
    argv = ["prepare", *none, "--source", "folder", "--input", str(corpus), "--out", str(clean)]
    assert cli.main(argv) == 0
    argv = ["poison", *none, "--method", "random", "--clean", str(clean), "--out", str(prot)]
    argv += ["--private", str(private)]
    assert cli.main([*argv, "--device", "cpu", "--grid-samples", "2"]) == 0
    export = ["export", "--protected", str(prot), "--out", str(out), "--native"]
    assert cli.main(export) == 2  # the private folder (noise) is not named
    assert cli.main([*export, "--private", str(private)]) == 0
    with Image.open(out / "big.png") as im:
        assert im.size == (800, 600)
    with Image.open(out / "tall.png") as im:
        assert im.size == (300, 450)
    assert "at each image's own size" in (out / "README.txt").read_text()
    verify = ["verify", "--clean", str(clean), "--protected", str(prot), "--native", str(out)]
    verify += ["--epsilon", "8"]
    assert cli.main(verify) == 0
    report = native.verify_native(clean, out, 8)
    assert report.ok and report.n_checked == 3 and report.max_linf == 8
    # one pixel pushed past the bound, or a resized image, fails
    pixels = np.asarray(Image.open(out / "big.png")).copy()
    pixels[5, 5] = np.where(pixels[5, 5] > 127, 0, 255)
    Image.fromarray(pixels).save(out / "big.png")
    assert cli.main(verify) == 1
    assert "linf" in native.verify_native(clean, out, 8).problems
    Image.fromarray(pixels[:300, :400]).save(out / "big.png")
    assert "size" in native.verify_native(clean, out, 8).problems


def test_export_native_needs_folder_format(tmp_path: Path, capsys) -> None:
    argv = ["export", "--protected", str(tmp_path), "--out", str(tmp_path / "o"), "--native"]
    assert cli.main([*argv, "--format", "webdataset"]) == 2
    assert "--native" in capsys.readouterr().err


def test_hostile_noise_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "triggers.json").write_text('{"ids": ["a", "b"]}')
    np.save(tmp_path / "noise.npy", np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="integer"):
        native.noise_rows(tmp_path, 32)
    np.save(tmp_path / "noise.npy", np.zeros((3, 3, 32, 32), np.int8))
    with pytest.raises(ValueError, match="shape"):
        native.noise_rows(tmp_path, 32)


def test_published_index_naming_a_path_outside_is_refused(tmp_path: Path, capsys) -> None:
    """A metadata.jsonl is input too: a file_name that leaves the folder is not followed."""
    folder = tmp_path / "pub"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"id": "a", "file_name": "../secret.png"}\n')
    with pytest.raises(ValueError, match="outside|plain relative"):
        native.published_files(folder)
    (folder / "metadata.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="line 1"):
        native.published_files(folder)
