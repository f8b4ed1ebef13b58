"""Small image helpers shared by poisoning, verification and pictures.

Library convention: images are ``(B, C, H, W)`` float in [0, 1]; stored pixels are uint8; noise is
int8 (or int16 for ε > 127) in pixel units, so ``protected = clip(clean_u8 + noise, 0, 255)``
holds exactly.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The file name endings read as images (a folder source, a published folder's extra files).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_working_resolution(image_bytes: bytes, size: int) -> np.ndarray:
    """Decode and bring an image to the working resolution: ``(3, size, size)`` uint8.

    Resize so the short side is ``size`` (bicubic), then centre-crop — the same geometry as the
    victim's evaluation preprocessing — and a no-op when the image is already ``size × size``, so
    protected pixels map one-to-one onto what a CLIP at that resolution sees.
    """
    with Image.open(io.BytesIO(image_bytes)) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def noise_dtype(epsilon: float) -> np.dtype:
    """Smallest signed integer type that holds noise of budget ``epsilon`` (pixel units)."""
    return np.dtype(np.int8) if epsilon <= 127 else np.dtype(np.int16)


def apply_noise(clean_u8: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``clip(clean + noise, 0, 255)`` as uint8; any shapes that broadcast."""
    return np.clip(clean_u8.astype(np.int16) + noise.astype(np.int16), 0, 255).astype(np.uint8)


def psnr(clean_u8: np.ndarray, other_u8: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = np.mean((clean_u8.astype(np.float64) - other_u8.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(clean_u8: np.ndarray, other_u8: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) over channels, uniform ``window`` filter.

    Inputs ``(3, H, W)`` uint8. Uses box filtering via cumulative sums (no SciPy needed).
    """
    x = clean_u8.astype(np.float64)
    y = other_u8.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    w = min(window, x.shape[-1], x.shape[-2])

    def box(a: np.ndarray) -> np.ndarray:
        # mean over every w×w window, "valid" mode
        s = np.cumsum(np.cumsum(np.pad(a, ((0, 0), (1, 0), (1, 0))), axis=1), axis=2)
        return (s[:, w:, w:] - s[:, :-w, w:] - s[:, w:, :-w] + s[:, :-w, :-w]) / (w * w)

    mx, my = box(x), box(y)
    vx, vy, cov = box(x * x) - mx**2, box(y * y) - my**2, box(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx**2 + my**2 + c1) * (vx + vy + c2)
    return float(np.mean(num / den))
