"""Text triggers: the candidate vocabulary, inserting a trigger into token rows, trigger text.

A trigger is ``k`` token ids placed at a word boundary of the caption: right after the start
token (``trigger_position: start``, the paper's choice) or before word ``p`` of the caption, ``p``
drawn once per image (``random``), so that dropping the first words of every caption does not
remove it. The protected caption file holds the caption with ``trigger_text`` inserted there; for
it to come back as the same tokens, candidates are restricted to whole-word, purely alphabetic BPE
tokens whose decoded text re-tokenizes to exactly that one id (the CLIP tokenizer splits words at
whitespace first, so such words never merge with their neighbours, and the tokens of a caption
are the tokens of its words in order: the trigger of word position ``p`` sits at token
``1 + len(encode(first p words))``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import torch

_WORD = re.compile(r"^[a-z]{2,}$")
MIN_WORD_LETTERS = 3  # trigger_vocab "words": no two-letter fragments ("ab", "xo")


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


def word_mask(tokenizer: Any, vocab_size: int, seen: torch.Tensor | None = None) -> torch.Tensor:
    """``trigger_vocab: words``: :func:`candidate_mask` restricted to words of at least
    :data:`MIN_WORD_LETTERS` letters and, when ``seen`` ((V,) bool) is given, to the tokens that
    occur in the training captions: a trigger then reads like words of the data set itself."""
    mask = candidate_mask(tokenizer, vocab_size)
    for tid in torch.nonzero(mask).flatten().tolist():
        if len(tokenizer.decoder[tid]) - len("</w>") < MIN_WORD_LETTERS:
            mask[tid] = False
    return mask & seen if seen is not None else mask


def trigger_index(pos: torch.Tensor, k: int) -> torch.Tensor:
    """Token columns of each row's trigger: ``pos[:, None] + [0, k)``, (B, k) long."""
    return pos.long()[:, None] + torch.arange(k, device=pos.device)


def gather_trigger(x: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Rows' trigger slices of ``x`` (B, L, ...): ``x[b, pos[b] : pos[b] + k]``, (B, k, ...)."""
    idx = trigger_index(pos.to(x.device), k)
    idx = idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def insert_trigger(
    tokens: torch.Tensor, trigger: torch.Tensor, eot_id: int, pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Place ``trigger`` before token column ``pos[b]`` of each row (default 1: after the start).

    tokens: (B, L) long, rows ``[SOT, t1..tn, EOT, 0..]`` as the open_clip tokenizer makes them.
    trigger: (B, k) long; pos: (B,) with ``1 <= pos <= L - 1 - k``. Returns (B, L):
    ``[SOT, t1..t(p-1), trigger, tp.., EOT, 0..]``; a row pushed past L is truncated and ends
    with EOT, exactly as the tokenizer would truncate the protected caption.
    """
    b, length = tokens.shape
    k = trigger.shape[1]
    if pos is None:
        out = torch.cat([tokens[:, :1], trigger, tokens[:, 1 : length - k]], dim=1)
    else:  # column j takes token j before the trigger, trigger j - p inside it, token j - k after
        j = torch.arange(length, device=tokens.device)[None, :]
        p = pos.to(tokens.device).long()[:, None]
        src = torch.where(j < p, j, torch.where(j < p + k, length + j - p, j - k))
        out = torch.cat([tokens, trigger.to(tokens.dtype)], dim=1).gather(1, src)
    lost_eot = ~(out == eot_id).any(dim=1)
    out[lost_eot, -1] = eot_id
    return out


def trigger_text(tokenizer: Any, ids: list[int]) -> str:
    """Words of a trigger, space-separated (each id decodes to one whole word)."""
    return " ".join(tokenizer.decode([i]).strip() for i in ids)


def protected_caption(trigger: str, caption: str, word: int = 0) -> str:
    """The caption as written to the protected set: the trigger words before word ``word``
    (0: first, the paper's layout; ``len(caption.split())``: last). The caption's own characters
    are kept as they are, the trigger and one space are inserted."""
    if not trigger:
        return caption
    if word <= 0:
        return f"{trigger} {caption}"
    starts = word_starts(caption)
    if word >= len(starts):
        return f"{caption} {trigger}"
    at = starts[word]
    return f"{caption[:at]}{trigger} {caption[at:]}"


def word_starts(caption: str) -> list[int]:
    """Character offset of each whitespace-separated word of ``caption``."""
    return [m.start() for m in re.finditer(r"\S+", caption)]


def token_offsets(tokenizer: Any, caption: str) -> list[int]:
    """Token column (after the start token) where a trigger before word ``p`` lands, for
    ``p = 0 .. len(words)``: ``1 + len(encode(caption up to word p))``."""
    starts = word_starts(caption)
    cuts = starts + [len(caption)]
    return [1 + len(tokenizer.encode(caption[:c])) if c else 1 for c in cuts]
