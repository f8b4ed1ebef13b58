"""EOT transformations (``poison.eot``): the differentiable JPEG against Pillow's encoder, the
random resize and the victim-interpolation crop, their composition, the config, and one tiny
poisoning run with every transformation on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mme.config import ConfigError, DataConfig, PoisonConfig, load_section
from mme.protection.methods.augment import (
    EOT_KINDS,
    draw_eot,
    eot,
    random_resize,
    random_resized_crop,
)
from mme.protection.methods.diffjpeg import LUMA_TABLE, dct_matrix, diff_jpeg, quant_tables


def smooth_noisy(size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 3, y * 3, (x + y) * 2], axis=-1) + 40
    return np.clip(base + rng.integers(-8, 9, (size, size, 3)), 0, 255).astype(np.uint8)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def pil_jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).astype(np.float64)


def test_dct_is_orthonormal() -> None:
    d = dct_matrix()
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)


@pytest.mark.parametrize(("quality", "first"), [(50, 16), (100, 1), (10, 80), (90, 3)])
def test_quant_tables_follow_libjpeg_scaling(quality: int, first: int) -> None:
    t = quant_tables(torch.tensor([quality]))
    assert t.shape == (1, 3, 8, 8) and t[0, 0, 0, 0] == first
    if quality == 50:
        assert torch.equal(t[0, 0], torch.tensor(LUMA_TABLE, dtype=torch.float32))


@pytest.mark.parametrize("quality", [50, 75, 90, 95])
def test_diff_jpeg_approximates_pillow(quality: int) -> None:
    """Closer to Pillow's decoded JPEG than JPEG is to its input (entropy coding is lossless;
    what remains: Pillow's smoother chroma upsampling and integer rounding)."""
    x = smooth_noisy()
    ours = diff_jpeg(to_tensor(x), torch.tensor([quality]))[0].permute(1, 2, 0).numpy() * 255
    ref = pil_jpeg(x, quality)
    assert np.abs(ours - ref).mean() < 0.6 * np.abs(ref - x).mean()


def test_diff_jpeg_gradient_shape_and_order() -> None:
    x = to_tensor(smooth_noisy(37)).requires_grad_(True)  # not a multiple of 8 or 16
    y = diff_jpeg(x.expand(2, -1, -1, -1), torch.tensor([20, 95]))
    assert y.shape == (2, 3, 37, 37)
    err = (y - x).abs().mean(dim=(1, 2, 3))
    assert err[0] > err[1] > 0  # lower quality, more loss
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_random_resize() -> None:
    x = to_tensor(smooth_noisy()).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_resize(x, gen, (1.0, 1.0)), x)
    y = random_resize(x, gen, (0.5, 0.5))
    assert y.shape == x.shape
    assert (y - x).abs().mean() > 0.005  # the downsampling lost the fine noise
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_modes(mode: str) -> None:
    x = to_tensor(smooth_noisy(32))
    gen = torch.Generator().manual_seed(0)
    whole = random_resized_crop(x, gen, scale=(1.0, 1.0), ratio=(1.0, 1.0), mode=mode)
    assert torch.allclose(whole, x, atol=1e-4)  # the full box is the identity in both modes
    a = random_resized_crop(x, torch.Generator().manual_seed(1), mode=mode)
    b = random_resized_crop(x, torch.Generator().manual_seed(1), mode="bilinear")
    assert a.shape == x.shape and (mode == "bilinear") == torch.equal(a, b)


def test_default_eot_is_the_old_crop_draw_for_draw() -> None:
    """``eot`` with the defaults consumes the generator exactly like the crop it replaces, so
    the noise of a protected set made with the defaults does not change."""
    x = to_tensor(smooth_noisy(32)).expand(4, -1, -1, -1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(eot(x, g1), random_resized_crop(x, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("kinds", [["crop"], ["resize", "jpeg", "crop"]])
def test_a_draw_for_the_batch_applies_to_any_share_of_it(kinds) -> None:
    """What torchrun relies on: every rank draws for the whole batch, each applies its rows,
    and image i gets image i's transformation of the one-process batch."""
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draw = draw_eot(5, g1, kinds, "bilinear")
    whole = eot(x, g2, kinds, "bilinear")  # draw + apply in one: the same stream
    assert torch.equal(g1.get_state(), g2.get_state()) and torch.equal(draw.apply(x), whole)
    for rows in (torch.tensor([0, 2, 4]), torch.tensor([1, 3])):
        assert torch.allclose(draw.rows(rows).apply(x[rows]), whole[rows], atol=1e-5)


def test_eot_order_is_fixed_and_kinds_checked() -> None:
    x = to_tensor(smooth_noisy(32)).expand(2, -1, -1, -1)
    a = eot(x, torch.Generator().manual_seed(0), ["crop", "jpeg", "resize"], "bicubic")
    b = eot(x, torch.Generator().manual_seed(0), list(reversed(EOT_KINDS)), "bicubic")
    assert torch.equal(a, b) and a.shape == x.shape
    with pytest.raises(ValueError, match="unknown EOT"):
        eot(x, torch.Generator(), ["blur"])


def test_config_parses_flags_and_rejects_ranges() -> None:
    cfg = load_section("poison", None, {"eot": "resize, jpeg,crop", "eot_resize": "0.75,1.5"})
    assert cfg.eot == ["resize", "jpeg", "crop"] and cfg.eot_resize == (0.75, 1.5)
    assert PoisonConfig().eot == ["crop"] and PoisonConfig().eot_interpolation == "bilinear"
    for bad in ({"eot": "blur"}, {"eot_jpeg_quality": "90,50"}, {"eot_resize": "0,2"}):
        with pytest.raises(ConfigError, match="poison"):
            load_section("poison", None, bad)


def test_poison_with_every_eot_transformation(tmp_path, monkeypatch, tiny_poison) -> None:
    """One tiny MEM round through resize + JPEG + bicubic crop: runs, stays in budget."""
    from mme.ingest.prepare import prepare
    from mme.protection.poison import poison

    monkeypatch.setenv("MME_TRACKING", "off")
    clean = tmp_path / "clean"
    prepare(DataConfig(source="synthetic", out=clean, n_train=8, n_test=2, image_size=64))
    cfg = PoisonConfig(
        clean=clean,
        out=tmp_path / "mem",
        private=tmp_path / "private",
        eot=["resize", "jpeg", "crop"],
        eot_interpolation="bicubic",
        **tiny_poison | {"rounds": 1, "pgd_steps": 2},
    )
    manifest = poison(cfg)
    assert manifest["verify"]["ok"] and 0 < manifest["verify"]["max_linf"] <= 8
    assert manifest["config"]["eot"] == ["resize", "jpeg", "crop"]
