"""The private truth about a protected set's triggers: ``oracle-strip`` and the score's reference.

NEEDS THE PRIVATE FILES. ``triggers.json`` of the poison run's private folder says, per image
id, whether it is protected, its trigger's words and (``trigger_position: random``) the word
index ``p`` they were inserted before. Every caption of a protected image holds the trigger at
words ``p .. p + k - 1`` (``p`` is drawn no larger than the shortest caption), so dropping that
window (:func:`mme.countermeasures.detect.drop_window`) gives back the clean caption exactly.

``oracle-strip`` does that: the upper bound of any text-side removal, i.e. what the image side
alone achieves. A data user cannot do it; it exists to measure. The file is read as hostile
input (a plain file, not a symlink, size-capped; ids, flags and words checked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mme import fsio, limits, shards
from mme.config import ConfigError
from mme.countermeasures.detect import Window

FILENAME = "triggers.json"
MAX_TRIGGER_WORDS = 16  # the manifest's cap on trigger_len


@dataclass(frozen=True)
class Truth:
    """One image's trigger: its words (empty: not protected) and the word index it sits at."""

    words: tuple[str, ...] = ()
    word: int = 0


class TriggerTable:
    """``triggers.json`` of a private folder, as ``id -> Truth``."""

    def __init__(self, rows: dict[str, Truth], path: Path) -> None:
        self.rows, self.path = rows, path

    @classmethod
    def load(cls, private: Path) -> TriggerTable:
        path = Path(private) / FILENAME
        try:
            raw = json.loads(fsio.read_regular(path, limits.MAX_FILE_BYTES))
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: the private folder of the poison run") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable ({err})".splitlines()[0]) from None
        try:
            return cls(parse_rows(raw), path)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path} is malformed: {err}".splitlines()[0]) from None

    def truth(self, key: str) -> Truth | None:
        """The image's trigger; ``None`` for an id the table does not list."""
        return self.rows.get(key)

    def windows(self, key: str, captions: list[str]) -> list[Window | None]:
        """Where the trigger sits in each caption (``None``: nothing to remove). A protected
        caption that does not hold the trigger there is refused: the wrong private folder."""
        t = self.truth(key)
        if t is None or not t.words:
            return [None] * len(captions)
        k = len(t.words)
        for i, caption in enumerate(captions):
            if tuple(caption.split()[t.word : t.word + k]) != t.words:
                raise ConfigError(
                    f"{self.path}: caption {i} of {key} does not hold its trigger at word "
                    f"{t.word}: this private folder does not belong to the protected set"
                )
        return [(t.word, k)] * len(captions)


def parse_rows(raw: Any) -> dict[str, Truth]:
    """``id -> Truth`` from the parsed ``triggers.json`` (see :mod:`mme.protection.poison`)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("ids"), list):
        raise ValueError("no list of ids")
    ids = raw["ids"]
    n = len(ids)
    protected = raw.get("protected") or [True] * n
    texts = raw.get("trigger_text") or [""] * n  # baselines: no triggers
    words = raw.get("trigger_word") or [0] * n  # start layout: no positions recorded
    if not len(protected) == len(texts) == len(words) == n:
        raise ValueError("ids, protected, trigger_text and trigger_word differ in length")
    rows = {}
    for key, prot, text, word in zip(ids, protected, texts, words, strict=True):
        if not isinstance(key, str) or not shards.KEY_RE.match(key) or key in rows:
            raise ValueError(f"bad or repeated id {str(key)[:80]!r}")
        if not isinstance(prot, bool) or not isinstance(text, str):
            raise ValueError(f"{key}: protected must be a bool and trigger_text a string")
        if isinstance(word, bool) or not isinstance(word, int) or word < 0:
            raise ValueError(f"{key}: trigger_word must be a whole number >= 0")
        split = tuple(text.split())
        if len(split) > MAX_TRIGGER_WORDS:
            raise ValueError(f"{key}: trigger of over {MAX_TRIGGER_WORDS} words")
        rows[key] = Truth(split if prot else (), word if prot and split else 0)
    return rows
