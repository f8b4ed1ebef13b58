"""Text triggers: the candidate vocabulary, inserting a trigger into token rows, trigger text.

A trigger is ``k`` token ids placed right after the start token, before the caption text. The
protected caption file holds ``trigger_text + " " + caption``; for it to come back as the same
tokens, candidates are restricted to whole-word, purely alphabetic BPE tokens whose decoded text
re-tokenizes to exactly that one id (the CLIP tokenizer splits words at whitespace first, so such
words never merge with their neighbours).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import torch

_WORD = re.compile(r"^[a-z]{2,}$")


@lru_cache(maxsize=4)
def _candidate_ids(tokenizer_key: tuple[int, int]) -> tuple[int, ...]:
    tokenizer = _TOKENIZERS[tokenizer_key]
    ids = []
    for tid, bpe in tokenizer.decoder.items():
        if not bpe.endswith("</w>") or tid in tokenizer.all_special_ids:
            continue
        word = bpe[: -len("</w>")]
        if _WORD.match(word) and tokenizer.encode(word) == [tid]:
            ids.append(tid)
    return tuple(sorted(ids))


_TOKENIZERS: dict[tuple[int, int], Any] = {}


def candidate_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)`` bool: token ids allowed in a trigger (see module docstring)."""
    key = (id(tokenizer), vocab_size)
    _TOKENIZERS[key] = tokenizer
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for i in _candidate_ids(key) if i < vocab_size]
    mask[torch.tensor(ids, dtype=torch.long)] = True
    return mask


def insert_trigger(tokens: torch.Tensor, trigger: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Place ``trigger`` right after the start token of each row.

    tokens: (B, L) long, rows ``[SOT, t1..tn, EOT, 0..]`` as the open_clip tokenizer makes them.
    trigger: (B, k) long. Returns (B, L): ``[SOT, trigger, t1.., EOT, 0..]``; a row pushed past L
    is truncated and ends with EOT, exactly as the tokenizer would truncate the protected caption.
    """
    b, length = tokens.shape
    k = trigger.shape[1]
    out = torch.cat([tokens[:, :1], trigger, tokens[:, 1 : length - k]], dim=1)
    lost_eot = ~(out == eot_id).any(dim=1)
    out[lost_eot, -1] = eot_id
    return out


def trigger_text(tokenizer: Any, ids: list[int]) -> str:
    """Words of a trigger, space-separated (each id decodes to one whole word)."""
    return " ".join(tokenizer.decode([i]).strip() for i in ids)


def protected_caption(trigger: str, caption: str) -> str:
    """The caption as written to the protected set: trigger words first."""
    return f"{trigger} {caption}" if trigger else caption


def round_trips(tokenizer: Any, ids: list[int]) -> bool:
    """True when the trigger's text tokenizes back to exactly ``ids``."""
    return tokenizer.encode(trigger_text(tokenizer, ids)) == list(ids)
