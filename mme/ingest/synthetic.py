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

import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mme.shards import Sample, encode_png, sha256_bytes

MAX_WORDS = 25

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
# Base RGB of each named colour; rendering jitters the shade around it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (238, 215, 45),
    "green": (45, 160, 55),
    "blue": (40, 85, 215),
    "purple": (130, 50, 170),
    "pink": (245, 125, 180),
    "brown": (125, 78, 35),
    "white": (242, 242, 242),
    "black": (22, 22, 22),
}
BG_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (215, 198, 160),
    "navy": (28, 38, 95),
    "teal": (30, 125, 125),
    "olive": (112, 112, 40),
    "maroon": (105, 28, 40),
    "lavender": (182, 166, 220),
    "mint": (168, 225, 190),
}
TEXTURES = ("plain", "stripes", "checker", "dots", "gradient", "mottled")
SIZES: dict[str, float] = {"small": 0.085, "medium": 0.13, "large": 0.19}  # half-extent / side
# Grid cell centres as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}
MIN_CONTRAST = 110.0  # min RGB distance between an object colour and its background colour

# Caption vocabulary: every entry is a truthful paraphrase of its key.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round disc", "ball"),
    "square": ("square", "box", "block", "square tile"),
    "triangle": ("triangle", "triangular shape", "triangle shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "cross": ("cross", "plus sign", "plus shape"),
    "ring": ("ring", "hoop", "donut"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
    "heart": ("heart", "heart shape", "love heart"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    **{c: (c,) for c in COLOURS},
    "purple": ("purple", "violet"),
    "grey": ("grey", "gray"),
    "beige": ("beige", "tan"),
    "navy": ("navy", "dark blue"),
    "teal": ("teal", "blue-green"),
    "olive": ("olive", "olive green"),
    "maroon": ("maroon", "dark red"),
    "lavender": ("lavender", "light purple"),
    "mint": ("mint", "pale green"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the upper left", "in the top left"),
    "top": ("at the top", "near the top", "in the upper middle"),
    "top right": ("in the top right corner", "at the upper right", "in the top right"),
    "left": ("on the left", "at the left side", "on the left side"),
    "centre": ("in the centre", "in the middle", "at the center"),
    "right": ("on the right", "at the right side", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the lower left", "in the bottom left"),
    "bottom": ("at the bottom", "near the bottom", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the lower right", "in the bottom right"),
}
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid", "flat"),
    "stripes": ("striped", "stripy"),
    "checker": ("checkered", "checkerboard", "chequered"),
    "dots": ("dotted", "polka-dot", "spotted"),
    "gradient": ("gradient", "shaded", "fading"),
    "mottled": ("mottled", "blotchy", "cloudy"),
}
BG_NOUNS = ("background", "backdrop")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

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


# ---------------------------------------------------------------------------------------------
# Scenes


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """Draw a scene description: ``{"background": {"texture", "colour"}, "objects": [...]}``.

    Each object is ``{"shape", "colour", "size", "position"}``; object 0 is the main one. Objects
    sit at distinct grid positions and each object colour contrasts with the background colour
    (distinct objects may share a colour or a shape, as in real scenes).
    """
    bg_colour = _choice(rng, list(BG_COLOURS))
    background = {"texture": _choice(rng, TEXTURES), "colour": bg_colour}
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    positions = rng.permutation(list(POSITIONS))[:n_objects]
    allowed = [c for c in COLOURS if _dist(COLOURS[c], BG_COLOURS[bg_colour]) >= MIN_CONTRAST]
    objects = []
    for k, position in enumerate(positions):
        # Extras are never large, so the main object stays the most salient thing in the image.
        sizes = list(SIZES) if k == 0 else ["small", "medium"]
        objects.append(
            {
                "shape": _choice(rng, SHAPES),
                "colour": _choice(rng, allowed),
                "size": _choice(rng, sizes),
                "position": str(position),
            }
        )
    return {"background": background, "objects": objects}


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _dist(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


# ---------------------------------------------------------------------------------------------
# Rendering


def supersampling(image_size: int) -> int:
    """Anti-aliasing factor: 4x for small images, fewer for large ones to stay fast."""
    return 4 if image_size <= 64 else 3 if image_size <= 128 else 2


def render(scene: dict[str, Any], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``scene`` as a (image_size, image_size, 3) uint8 array, with nuisance variation."""
    ss = supersampling(image_size)
    side = image_size * ss
    canvas = _background(scene["background"], side, rng)
    _draw_clutter(canvas, rng)
    # Main object last: it is never hidden by the extras.
    for obj in reversed(scene["objects"]):
        _draw_object(canvas, obj, rng)
    small = canvas.reshape(image_size, ss, image_size, ss, 3).mean(axis=(1, 3))
    return _photometric(small, rng)


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A shade of a named colour: brightness scale plus a small per-channel tint."""
    base = np.asarray(rgb, dtype=np.float32)
    shade = base * rng.uniform(0.85, 1.1) + rng.normal(0.0, 7.0, size=3)
    return np.clip(shade, 0, 255).astype(np.float32)


def _second_tone(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The other colour of a two-tone texture: a lighter or darker version of ``base``."""
    amount = rng.uniform(0.22, 0.38)
    if base.mean() < 110:  # dark colours get lighter stripes, light ones darker
        return base + (255.0 - base) * amount
    return base * (1.0 - amount)


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): ``(x, y)``, each (1, side) / (side, 1) for broadcast."""
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    return coords[None, :], coords[:, None]


def _background(bg: dict[str, str], side: int, rng: np.random.Generator) -> np.ndarray:
    """Textured background, float32 (side, side, 3) in 0..255."""
    base = _jitter_colour(BG_COLOURS[bg["colour"]], rng)
    other = _second_tone(base, rng)
    weight = _TEXTURES[bg["texture"]](side, rng)  # 0 -> base, 1 -> other
    return base + weight[..., None] * (other - base)


def _tex_plain(side: int, rng: np.random.Generator) -> np.ndarray:
    return np.zeros((side, side), dtype=np.float32)


def _tex_stripes(side: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(side)
    angle = rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-10, 10)
    t = math.radians(angle)
    period = rng.uniform(0.08, 0.16)
    u = (x * math.cos(t) + y * math.sin(t)) / period + rng.uniform()
    return (np.mod(u, 1.0) < 0.5).astype(np.float32)


def _tex_checker(side: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(side)
    period = rng.uniform(0.1, 0.2)
    u = np.floor(x / period + rng.uniform()) + np.floor(y / period + rng.uniform())
    return np.mod(u, 2.0).astype(np.float32)


def _tex_dots(side: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(side)
    period = rng.uniform(0.08, 0.14)
    radius = period * rng.uniform(0.18, 0.3)
    dx = np.mod(x / period + rng.uniform(), 1.0) - 0.5
    dy = np.mod(y / period + rng.uniform(), 1.0) - 0.5
    return ((dx * dx + dy * dy) * period * period < radius * radius).astype(np.float32)


def _tex_gradient(side: int, rng: np.random.Generator) -> np.ndarray:
    return (_linear_ramp(side, side, rng, amplitude=0.5) - 0.5).clip(0.0, 1.0) * 2.0


def _tex_mottled(side: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency blotches: a coarse random grid, bilinearly upsampled."""
    cells = int(rng.integers(4, 8))
    coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


_TEXTURES: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "plain": _tex_plain,
    "stripes": _tex_stripes,
    "checker": _tex_checker,
    "dots": _tex_dots,
    "gradient": _tex_gradient,
    "mottled": _tex_mottled,
}


def _linear_ramp(h: int, w: int, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """(h, w) map ``1 +- amplitude`` along a random direction: lighting, shading, gradients."""
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    t = rng.uniform(0.0, 2.0 * math.pi)
    u = (x - 0.5) * math.cos(t) + (y - 0.5) * math.sin(t)  # in [-0.71, 0.71]
    return (1.0 + 2.0 * amplitude * u).astype(np.float32)


def _unit_outline(shape: str) -> list[np.ndarray]:
    """Polygons (N, 2) of a shape centred at 0 with half-extent ~1; later ones are holes."""
    ang = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    circle = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if shape == "circle":
        return [circle]
    if shape == "ring":
        return [circle, circle * 0.55]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * 0.85]
    if shape == "triangle":
        t = np.radians([-90.0, 30.0, 150.0])
        return [np.stack([np.cos(t), np.sin(t) + 0.2], axis=1) * 1.1]
    if shape == "diamond":
        return [np.array([[0, -1.1], [0.72, 0], [0, 1.1], [-0.72, 0]], dtype=float)]
    if shape == "star":
        t = np.radians(np.arange(10) * 36.0 - 90.0)
        r = np.where(np.arange(10) % 2 == 0, 1.15, 0.48)
        return [np.stack([r * np.cos(t), r * np.sin(t) + 0.08], axis=1)]
    if shape == "cross":
        a, b = 1.0, 0.32
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b)]
        pts += [(b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [np.array(pts, dtype=float)]
    if shape == "heart":
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([hx, hy + 2.5], axis=1) / 15.5]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _paint(
    canvas: np.ndarray,
    box: tuple[float, float, float, float],
    draw_fn: Callable[[ImageDraw.ImageDraw, tuple[int, int]], None],
    colour: np.ndarray,
    alpha: float = 1.0,
) -> None:
    """Alpha-blend ``colour`` into ``canvas`` (in place) where ``draw_fn`` draws, within ``box``.

    Only the bounding box is rasterised and blended, which keeps rendering fast at any size.
    ``draw_fn(draw, (x0, y0))`` draws white on a mask whose origin is canvas pixel (x0, y0);
    ``colour`` is an RGB triple or an (h, w, 3) array matching the clipped box.
    """
    side = canvas.shape[0]
    x0, y0 = max(0, math.floor(box[0]) - 1), max(0, math.floor(box[1]) - 1)
    x1, y1 = min(side, math.ceil(box[2]) + 2), min(side, math.ceil(box[3]) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw_fn(ImageDraw.Draw(mask), (x0, y0))
    weight = np.asarray(mask, dtype=np.float32)[..., None] * (alpha / 255.0)
    region = canvas[y0:y1, x0:x1]
    region += weight * (colour - region)


def _draw_object(canvas: np.ndarray, obj: dict[str, str], rng: np.random.Generator) -> None:
    """Paint one object in place with pose jitter (position, size, rotation) and soft shading."""
    side = canvas.shape[0]
    cx, cy = POSITIONS[obj["position"]]
    centre = (np.array([cx, cy]) + rng.uniform(-0.05, 0.05, size=2)) * side
    scale = SIZES[obj["size"]] * rng.uniform(0.88, 1.12) * side
    theta = math.radians(rng.uniform(-15.0, 15.0))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    polys = [poly @ rot.T * scale + centre for poly in _unit_outline(obj["shape"])]
    lo, hi = polys[0].min(axis=0), polys[0].max(axis=0)
    colour = _jitter_colour(COLOURS[obj["colour"]], rng)
    x0, y0 = max(0, math.floor(lo[0]) - 1), max(0, math.floor(lo[1]) - 1)
    x1, y1 = min(side, math.ceil(hi[0]) + 2), min(side, math.ceil(hi[1]) + 2)
    shading = _linear_ramp(max(y1 - y0, 1), max(x1 - x0, 1), rng, amplitude=0.08)

    def draw_fn(draw: ImageDraw.ImageDraw, origin: tuple[int, int]) -> None:
        for k, pts in enumerate(polys):  # polygons after the first are holes (ring)
            local = [tuple(p) for p in (pts - np.array(origin)).tolist()]
            draw.polygon(local, fill=255 if k == 0 else 0)

    _paint(canvas, (lo[0], lo[1], hi[0], hi[1]), draw_fn, colour * shading[..., None])


def _draw_clutter(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """0-3 small unmentioned marks (specks, short strokes) in muted colours, in place."""
    for _ in range(int(rng.integers(0, 4))):
        _draw_mark(canvas, rng)


def _draw_mark(canvas: np.ndarray, rng: np.random.Generator) -> None:
    side = canvas.shape[0]
    x, y = rng.uniform(0.05, 0.95, size=2) * side
    r = rng.uniform(0.012, 0.03) * side
    speck = rng.uniform() < 0.5
    dx, dy = rng.normal(0.0, 1.0, size=2) * r * 2.0
    grey = (rng.uniform(40, 215) + rng.normal(0.0, 12.0, size=3)).astype(np.float32)
    ext = r if speck else max(abs(dx), abs(dy)) + r

    def draw_fn(draw: ImageDraw.ImageDraw, origin: tuple[int, int]) -> None:
        px, py = x - origin[0], y - origin[1]
        if speck:
            draw.ellipse([px - r, py - r, px + r, py + r], fill=255)
        else:
            width = max(1, int(r * 0.6))
            draw.line([px - dx, py - dy, px + dx, py + dy], fill=255, width=width)

    _paint(canvas, (x - ext, y - ext, x + ext, y + ext), draw_fn, grey, rng.uniform(0.5, 0.9))


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like nuisances on the final image: lighting, brightness, contrast, sensor noise."""
    img = img * _linear_ramp(*img.shape[:2], rng, amplitude=0.1)[..., None]
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.8, 1.15) + mean + rng.uniform(-18.0, 18.0)
    img = img + rng.normal(0.0, rng.uniform(1.5, 5.0), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: dict[str, str], rng: np.random.Generator, size: bool, pos: bool) -> str:
    """``a [size] colour shape [position]``, with synonyms drawn from ``rng``."""
    words = [_pick(rng, SIZE_WORDS[obj["size"]])] if size else []
    words += [_pick(rng, COLOUR_WORDS[obj["colour"]]), _pick(rng, SHAPE_WORDS[obj["shape"]])]
    phrase = _article(" ".join(words))
    return f"{phrase} {_pick(rng, POSITION_WORDS[obj['position']])}" if pos else phrase


def _bg_phrase(bg: dict[str, str], rng: np.random.Generator) -> str:
    """``a striped grey background`` and variants (adjective order varies, as with people)."""
    tex = _pick(rng, TEXTURE_WORDS[bg["texture"]])
    col = _pick(rng, COLOUR_WORDS[bg["colour"]])
    first, second = (tex, col) if rng.uniform() < 0.5 else (col, tex)
    return _article(f"{first} {second} {_pick(rng, BG_NOUNS)}")


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _others(scene: dict[str, Any], rng: np.random.Generator, pos: bool) -> list[str]:
    return [_noun_phrase(o, rng, size=rng.uniform() < 0.3, pos=pos) for o in scene["objects"][1:]]


def _cap_full(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """``a big red star on the left on a striped grey background, with a blue ring ...``"""
    main = _noun_phrase(scene["objects"][0], rng, size=True, pos=True)
    text = f"{main} on {_bg_phrase(scene['background'], rng)}"
    others = _others(scene, rng, pos=rng.uniform() < 0.5)
    return f"{text}, with {_join(others)}" if others else text


def _cap_background_first(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """``a checkered teal backdrop with a yellow heart in the middle and a pink box``"""
    main = _noun_phrase(scene["objects"][0], rng, size=rng.uniform() < 0.5, pos=True)
    head = _bg_phrase(scene["background"], rng)
    return _join([f"{head} with {main}", *_others(scene, rng, pos=False)])


def _cap_objects_only(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """``two shapes: a small white cross at the top and a black ring on the left``"""
    objs = scene["objects"]
    main = _noun_phrase(objs[0], rng, size=True, pos=True)
    if len(objs) == 1:
        return f"{_pick(rng, ('a single', 'just one', 'only one'))} {main.split(' ', 1)[1]}"
    noun = _pick(rng, ("shapes", "objects", "figures"))
    return f"{COUNT_WORDS[len(objs)]} {noun}: {_join([main, *_others(scene, rng, pos=True)])}"


def _cap_position_first(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """``in the top left corner there is a large orange diamond, on a plain mint background``"""
    obj = scene["objects"][0]
    main = _noun_phrase(obj, rng, size=rng.uniform() < 0.7, pos=False)
    text = f"{_pick(rng, POSITION_WORDS[obj['position']])} there is {main}"
    if rng.uniform() < 0.5:
        text += f", on {_bg_phrase(scene['background'], rng)}"
    return text


def _cap_short(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """Main object only: ``a green triangle at the bottom`` / ``a triangle coloured green``."""
    obj = scene["objects"][0]
    if rng.uniform() < 0.5:
        return _noun_phrase(obj, rng, size=rng.uniform() < 0.5, pos=True)
    shape = _pick(rng, SHAPE_WORDS[obj["shape"]])
    colour = _pick(rng, COLOUR_WORDS[obj["colour"]])
    pos = _pick(rng, POSITION_WORDS[obj["position"]])
    return f"{_article(shape)} {_pick(rng, ('coloured', 'colored', 'painted'))} {colour} {pos}"


def _cap_background_clause(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """``there is a purple star on the right and the background is dotted beige``"""
    main = _noun_phrase(scene["objects"][0], rng, size=rng.uniform() < 0.5, pos=True)
    bg = scene["background"]
    tex = _pick(rng, TEXTURE_WORDS[bg["texture"]])
    col = _pick(rng, COLOUR_WORDS[bg["colour"]])
    lead = _pick(rng, ("there is ", "", "this image shows "))
    return f"{lead}{main} and the {_pick(rng, BG_NOUNS)} is {tex} {col}"


def _cap_picture(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """``a picture of a red heart and a small blue block against a gradient navy background``"""
    main = _noun_phrase(scene["objects"][0], rng, size=rng.uniform() < 0.5, pos=False)
    lead = _pick(rng, ("a picture of", "an image of", "a drawing of", "a graphic showing"))
    where = _pick(rng, ("against", "on", "over"))
    objs = _join([main, *_others(scene, rng, pos=False)])
    return f"{lead} {objs} {where} {_bg_phrase(scene['background'], rng)}"


_TEMPLATES: tuple[Callable[[dict[str, Any], np.random.Generator], str], ...] = (
    _cap_full,
    _cap_background_first,
    _cap_objects_only,
    _cap_position_first,
    _cap_short,
    _cap_background_clause,
    _cap_picture,
)


def make_captions(scene: dict[str, Any], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` paraphrased captions of ``scene``, from different templates in random order.

    Every caption names the main object's colour and shape (with synonyms) and is truthful,
    lower-case ASCII without newlines, at most :data:`MAX_WORDS` words. Captions are distinct when
    the templates allow it (a few retries per caption, then a duplicate is accepted).
    """
    order = rng.permutation(len(_TEMPLATES))
    captions: list[str] = []
    for k in range(count):
        template = _TEMPLATES[order[k % len(order)]]
        text = ""
        for _attempt in range(12):
            text = template(scene, rng)
            if len(text.split()) > MAX_WORDS:  # long multi-object variants: fall back to main
                text = _cap_short(scene, rng)
            if text not in captions:
                break
        captions.append(text)
    return captions
