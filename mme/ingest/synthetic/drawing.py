"""Rendering a scene: anti-aliased (drawn at 2-4x and box-downsampled), with the nuisance
variation captions never mention (shade, jitter, rotation, texture phase, clutter, lighting,
sensor noise)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mme.ingest.synthetic.scene import BG_COLOURS, COLOURS, POSITIONS, SHAPES, SIZES

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
