"""What a data user may do to a published set, as pure functions: the attacks of ``mme attack``.

Each attack is named by a spec ``NAME`` or ``NAME:ARG`` (:func:`parse_spec`):

========================  ======================================================================
``jpeg:Q``                re-encode as JPEG, quality Q (1-100; Pillow, 4:2:0 chroma subsampling)
``resize:S``              resize so the short side is S px (bicubic, Pillow's antialiasing)
``img2dataset``           what the img2dataset scraper does with its defaults (see
                          :func:`img2dataset_like`): 256 x 256 "border" resize + JPEG q95
``blur:SIGMA``            Gaussian blur, standard deviation SIGMA px
``grayscale``             luma only (ITU-R 601, Pillow's ``L``), stored as RGB
``iss[:Q]``               Image Shortcut Squeezing: grayscale, then JPEG quality Q (default 10)
``strip-trigger[:K]``     drop the first K words (default 3) of every caption
``shuffle-words``         shuffle the words of every caption (seeded per image and caption)
``detect-trigger[:K]``    drop the K-word window repeated at one word index in every caption of
                          an image (published files only; K: the manifest's trigger_len, else 3)
``detect-ngram[:K]``      per caption, drop the K words whose removal makes it most likely under
                          a bigram model of the other images' captions (published files only)
``oracle-strip``          NEEDS THE PRIVATE FILES: drop the exact trigger (triggers.json), the
                          upper bound of any text-side removal
========================  ======================================================================

The last three need the whole split (:mod:`mme.countermeasures.detect`,
:mod:`mme.countermeasures.oracle`): ``mme attack`` fits and applies them;
:func:`attack_captions` refuses them.

Image functions take and return ``(H, W, 3)`` uint8 arrays, or return the encoded bytes when the
attack *is* an encoding (JPEG). Everything is deterministic: the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import random

import numpy as np
from PIL import Image

from mme.config.specs import (
    K_FROM_MANIFEST,
    SPECS,
    TEXT_ATTACKS,
    WHOLE_SPLIT,
    AttackSpec,
    parse_spec,
    slug,
)

__all__ = [
    "K_FROM_MANIFEST",
    "SPECS",
    "TEXT_ATTACKS",
    "WHOLE_SPLIT",
    "AttackSpec",
    "parse_spec",
    "slug",
]

# img2dataset's documented defaults (README "API" and img2dataset/resizer.py, rom1504/img2dataset)
I2D_SIZE, I2D_QUALITY, I2D_BORDER = 256, 95, (255, 255, 255)


# -- images ---------------------------------------------------------------------------------


def _pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG of ``(H, W, 3)`` uint8 at ``quality`` (Pillow defaults otherwise)."""
    buf = io.BytesIO()
    _pil(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``(H, W, 3)`` uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def resize_short_side(pixels: np.ndarray, side: int) -> np.ndarray:
    """Resize so that ``min(H, W) == side``, keeping the aspect ratio (bicubic, antialiased)."""
    h, w = pixels.shape[:2]
    scale = side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(_pil(pixels).resize(size, Image.Resampling.BICUBIC))


def img2dataset_like(pixels: np.ndarray) -> bytes:
    """img2dataset's default resize and encoding, with Pillow in place of OpenCV.

    Its defaults (rom1504/img2dataset README, "API"; ``Resizer`` in ``img2dataset/resizer.py``):
    ``image_size=256``, ``resize_mode="border"`` (the longest side is scaled to 256, then the
    image is padded to 256 x 256 with white, centred), ``resize_only_if_bigger=False``,
    ``upscale_interpolation="lanczos"``, ``downscale_interpolation="area"``,
    ``encode_quality=95``, ``encode_format="jpg"``. Pillow's LANCZOS and BOX stand in for
    OpenCV's INTER_LANCZOS4 and INTER_AREA, so pixels differ slightly from the real tool's.
    """
    h, w = pixels.shape[:2]
    scale = I2D_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    im = _pil(pixels).resize(size, method) if size != (w, h) else _pil(pixels)
    canvas = Image.new("RGB", (I2D_SIZE, I2D_SIZE), I2D_BORDER)
    canvas.paste(im, ((I2D_SIZE - size[0]) // 2, (I2D_SIZE - size[1]) // 2))
    return encode_jpeg(np.asarray(canvas), I2D_QUALITY)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of standard deviation ``sigma``, radius ``ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders; uint8 in, uint8 out (rounded)."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = pixels.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > r else "edge")
        n = out.shape[axis]
        out = sum(k[i] * np.take(padded, range(i, i + n), axis=axis) for i in range(len(k)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def grayscale(pixels: np.ndarray) -> np.ndarray:
    """Luma (Pillow ``L``: 0.299 R + 0.587 G + 0.114 B) copied to three channels."""
    luma = np.asarray(_pil(pixels).convert("L"))
    return np.repeat(luma[..., None], 3, axis=2)


def image_shortcut_squeezing(pixels: np.ndarray, quality: int = 10) -> bytes:
    """Grayscale then low-quality JPEG: both squeezes of Image Shortcut Squeezing.

    Liu, Zhao and Larson, "Image Shortcut Squeezing: Countering Perturbative Availability
    Poisons with Compression", ICML 2023 (arXiv 2302.03335): simple compressions remove the
    shortcut that availability poisons (unlearnable examples) plant; grayscale (ISS-G) works best
    against noise that lives in colour, low-quality JPEG (ISS-J, quality 10) against
    high-frequency L∞ noise. Here the two are applied together, the stronger preprocessing a
    wary trainer could run without any training of its own.
    """
    return encode_jpeg(grayscale(pixels), quality)


def attack_image(spec: AttackSpec, pixels: np.ndarray) -> tuple[bytes, str] | np.ndarray | None:
    """The attacked image: encoded ``(bytes, "jpg")`` for encodings, an array for pixel
    transforms, ``None`` when ``spec`` leaves images alone (text attacks)."""
    name, arg = spec.name, spec.arg
    if name == "jpeg":
        return encode_jpeg(pixels, int(arg)), "jpg"
    if name == "img2dataset":
        return img2dataset_like(pixels), "jpg"
    if name == "iss":
        return image_shortcut_squeezing(pixels, int(arg)), "jpg"
    if name == "resize":
        return resize_short_side(pixels, int(arg))
    if name == "blur":
        return gaussian_blur(pixels, float(arg))
    if name == "grayscale":
        return grayscale(pixels)
    return None


# -- captions -------------------------------------------------------------------------------


def strip_words(caption: str, k: int) -> str:
    """Drop the first ``k`` words; a caption of ``k`` words or fewer keeps its last word (an
    empty caption would be no training pair at all)."""
    words = caption.split()
    return " ".join(words[k:] if len(words) > k else words[-1:])


def shuffle_words(caption: str, rng: random.Random) -> str:
    """The caption's words in a random order drawn from ``rng``."""
    words = caption.split()
    rng.shuffle(words)
    return " ".join(words)


def caption_rng(seed: int, key: str, index: int) -> random.Random:
    """A generator that depends only on (seed, sample key, caption index), not on the order in
    which samples are processed."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def attack_captions(spec: AttackSpec, captions: list[str], key: str, seed: int) -> list[str]:
    """The attacked captions of sample ``key`` (unchanged for image attacks)."""
    if spec.name in WHOLE_SPLIT:
        raise ValueError(f"{spec.name} needs the whole split: run it with `mme attack`")
    if spec.name == "strip-trigger":
        return [strip_words(c, int(spec.arg)) for c in captions]
    if spec.name == "shuffle-words":
        return [shuffle_words(c, caption_rng(seed, key, i)) for i, c in enumerate(captions)]
    return list(captions)
