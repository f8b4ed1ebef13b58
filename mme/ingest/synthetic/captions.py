"""Captions of a scene: paraphrases in the style of Flickr/COCO annotators (varied templates,
synonyms and word orders), truthful, lower-case ASCII, at most ``MAX_WORDS`` words."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mme.ingest.synthetic.scene import (
    BG_NOUNS,
    COLOUR_WORDS,
    COUNT_WORDS,
    MAX_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_WORDS,
)

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
