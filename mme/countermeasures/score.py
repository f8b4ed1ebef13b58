"""How well a text countermeasure removed the trigger, against the private ``triggers.json``.

For measuring only, never part of a published pipeline: it NEEDS THE PRIVATE FILES
(:mod:`mme.countermeasures.oracle`). Words are counted per caption, at word indices of the protected
caption: a removed word is a hit when the trigger sits there.

- ``precision``: hits / removed words; ``recall``: hits / trigger words;
- ``images_exact``: protected images whose trigger window was removed, and nothing else, in
  every caption; ``unprotected_untouched``: listed unprotected images with nothing removed;
- ``captions_exact``: attacked captions equal to the clean ones (the protected caption without
  its trigger, :func:`mme.countermeasures.detect.drop_window`, which is exact).

Ids that ``triggers.json`` does not list are counted in ``images_unlisted`` and left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mme.countermeasures import detect
from mme.countermeasures.detect import Window
from mme.countermeasures.oracle import TriggerTable
from mme.countermeasures.transforms import AttackSpec


def window_words(window: Window | None) -> set[int]:
    return set() if window is None else set(range(window[0], window[0] + window[1]))


@dataclass
class Score:
    """Running counts; :meth:`add` one image at a time, :meth:`summary` at the end."""

    images: int = 0
    images_protected: int = 0
    images_exact: int = 0
    images_unlisted: int = 0
    unprotected_untouched: int = 0
    captions: int = 0
    captions_exact: int = 0
    words_removed: int = 0
    words_trigger: int = 0
    words_hit: int = 0

    def add(
        self,
        table: TriggerTable,
        key: str,
        protected: list[str],
        removed: list[Window | None] | None,
        attacked: list[str],
    ) -> None:
        """One image: its ``protected`` captions, the windows a countermeasure ``removed``
        (``None``: it removes no words, e.g. an image attack) and the ``attacked`` captions."""
        truth = table.truth(key)
        if truth is None:
            self.images_unlisted += 1
            return
        true = table.windows(key, protected)
        removed = removed if removed is not None else [None] * len(protected)
        clean = detect.apply(protected, true)
        self.images += 1
        self.captions += len(protected)
        self.captions_exact += sum(a == c for a, c in zip(attacked, clean, strict=True))
        for got, want in zip(removed, true, strict=True):
            g, t = window_words(got), window_words(want)
            self.words_removed += len(g)
            self.words_trigger += len(t)
            self.words_hit += len(g & t)
        if truth.words:
            self.images_protected += 1
            self.images_exact += removed == true
        else:
            self.unprotected_untouched += all(r is None for r in removed)

    def summary(self) -> dict[str, Any]:
        """The counts plus ``precision`` and ``recall`` (``None`` when undefined)."""
        out: dict[str, Any] = asdict(self)
        out["precision"] = self.words_hit / self.words_removed if self.words_removed else None
        out["recall"] = self.words_hit / self.words_trigger if self.words_trigger else None
        return out


def line(spec: str, s: dict[str, Any]) -> str:
    """One human-readable line of :meth:`Score.summary`."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"mme attack: {spec} scored against the PRIVATE triggers.json (measuring only): "
        f"precision {f(s['precision'])}, recall {f(s['recall'])}; trigger removed exactly in "
        f"{s['images_exact']} of {s['images_protected']} protected images; "
        f"{s['captions_exact']} of {s['captions']} captions restored exactly"
    )


def removed_by(spec: AttackSpec, captions: list[str]) -> list[Window | None] | None:
    """The words a stateless text attack removes: ``strip-trigger:K`` drops the first K words
    (all but the last of a shorter caption); the others remove none (``None``)."""
    if spec.name != "strip-trigger":
        return None
    k, out = int(spec.arg), []
    for caption in captions:
        n = len(caption.split())
        out.append((0, k) if n > k else (0, n - 1) if n > 1 else None)
    return out
