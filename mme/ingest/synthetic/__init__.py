"""Embedded synthetic image-caption dataset: compositional scenes with paraphrased captions.

``generate(split, n)`` yields :class:`mme.shards.Sample` records ``syn-{split}-{index:06d}``;
no files or downloads are needed, and the output is a pure function of
``(seed, split, index, image_size, captions_per_image)``:

- Each index has its own random streams, seeded by ``(seed, crc32(split), index, stream)``, so an
  image never depends on ``n`` or on the other images, and the scene (what is drawn) does not depend
  on ``image_size`` or ``captions_per_image``. Same arguments give byte-identical PNGs.
- A scene is 1-3 objects on a textured background. Each object has a shape (:data:`SHAPES`), a
  colour (:data:`COLOURS`), a size (small / medium / large) and a position on a 3x3 grid
  (:data:`POSITIONS`); object 0 is the *main* object (drawn last, never occluded, named in every
  caption). The background has a texture (:data:`TEXTURES`) and a colour (:data:`BG_COLOURS`).
- Rendering is anti-aliased (drawn at 2-4x and box-downsampled) and carries nuisance variation that
  captions never mention: colour shade, size and position jitter, rotation, texture phase and scale,
  small clutter marks, uneven lighting, brightness/contrast jitter and sensor noise. The nuisances
  make the content about as hard to pick up as a small natural photo while keeping it learnable.
- Captions are paraphrases in the style of Flickr/COCO annotators: varied templates, synonyms and
  word orders, some with the background, some with only the objects, all truthful, lower-case ASCII,
  at most :data:`MAX_WORDS` words, distinct within an image whenever the templates allow.

``meta`` is ``{"id", "source": "synthetic", "sha256", "width", "height", "split", "index", "seed",
"scene"}`` where ``scene`` is :func:`sample_scene`'s dict (JSON-serialisable).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from mme.ingest.synthetic.captions import make_captions
from mme.ingest.synthetic.drawing import render, supersampling
from mme.ingest.synthetic.scene import (
    BG_COLOURS,
    BG_NOUNS,
    COLOUR_WORDS,
    COLOURS,
    COUNT_WORDS,
    MAX_WORDS,
    MIN_CONTRAST,
    POSITION_WORDS,
    POSITIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    TEXTURE_WORDS,
    TEXTURES,
    sample_scene,
)
from mme.shards import Sample, encode_png, sha256_bytes

__all__ = [
    "BG_COLOURS",
    "BG_NOUNS",
    "COLOURS",
    "COLOUR_WORDS",
    "COUNT_WORDS",
    "MAX_WORDS",
    "MIN_CONTRAST",
    "POSITIONS",
    "POSITION_WORDS",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZES",
    "SIZE_WORDS",
    "TEXTURES",
    "TEXTURE_WORDS",
    "generate",
    "image_rng",
    "make_captions",
    "make_sample",
    "render",
    "sample_scene",
    "split_code",
    "supersampling",
]


_STREAM_SCENE, _STREAM_RENDER, _STREAM_CAPTIONS = 0, 1, 2


def split_code(split: str) -> int:
    """Stable integer code of a split name (CRC32), part of every per-image seed."""
    return zlib.crc32(split.encode("utf-8"))


def image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The independent random stream ``stream`` of one image (``seed`` must be >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, split_code(split), index, stream])


def generate(
    split: str,
    n: int,
    *,
    image_size: int = 64,
    captions_per_image: int = 5,
    seed: int = 0,
) -> Iterator[Sample]:
    """Yield ``n`` samples ``syn-{split}-{i:06d}`` for ``i`` in ``range(n)`` (see module doc)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for index in range(n):
        yield make_sample(
            split, index, image_size=image_size, captions_per_image=captions_per_image, seed=seed
        )


def make_sample(
    split: str, index: int, *, image_size: int = 64, captions_per_image: int = 5, seed: int = 0
) -> Sample:
    """The sample at ``index`` of ``split``; identical to the one :func:`generate` yields there."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    scene = sample_scene(image_rng(seed, split, index, _STREAM_SCENE))
    pixels = render(scene, image_size, image_rng(seed, split, index, _STREAM_RENDER))
    captions = make_captions(
        scene, captions_per_image, image_rng(seed, split, index, _STREAM_CAPTIONS)
    )
    png = encode_png(pixels)
    sample_id = f"syn-{split}-{index:06d}"
    meta = {
        "id": sample_id,
        "source": "synthetic",
        "sha256": sha256_bytes(png),
        "width": image_size,
        "height": image_size,
        "split": split,
        "index": index,
        "seed": seed,
        "scene": scene,
    }
    return Sample(id=sample_id, image_bytes=png, image_ext="png", captions=captions, meta=meta)
