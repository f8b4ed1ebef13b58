"""What a synthetic image shows: the vocabulary (shapes, colours, sizes, positions, textures,
and the caption words for each) and :func:`sample_scene`, a scene drawn from it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
