"""The checks of one clean/protected pair (``image``, ``linf``, ``noise``, ``trigger``,
``caption``, ``meta``: see :mod:`mme.protection.verify`) and the context they need (settings of
the run, and from the private folder ``triggers.json`` and ``noise.npy``).

Every check is a pure function of the pair and the context, so pairs are checked in any process
in any order and the report is the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mme.config import ConfigError
from mme.imageops import psnr, ssim, to_working_resolution
from mme.manifest import Manifest
from mme.protection.verify_report import VerifyReport
from mme.shards import PRIVATE_META, Sample, sha256_bytes

# --------------------------------------------------------------------------------- checks


@dataclass
class Context:
    """Everything a pair check needs besides the pair itself."""

    size: int
    epsilon: float
    trigger_len: int | None
    tokenizer: Any
    triggers: dict[str, tuple[str, list[int]]] | None = None  # id -> (text, ids), triggers.json
    protect: dict[str, bool] | None = None  # id -> protected, triggers.json
    words: dict[str, int] | None = None  # id -> trigger word position, triggers.json (random)
    noise: np.ndarray | None = None  # memory-mapped noise.npy
    noise_row: dict[str, int] | None = None  # id -> row of noise.npy


def check_image(p: Sample, size: int) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
    """Decode the protected image as (3, S, S) uint8; None plus the reason when unusable."""
    if p.image_ext != "png":
        return None, [("image", f"stored as {p.image_ext}, expected lossless png")]
    try:
        pixels = p.image().transpose(2, 0, 1)
    except OSError as err:
        return None, [("image", f"cannot decode: {err}")]
    h, w = pixels.shape[1:]
    if (h, w) != (size, size):
        return None, [("image", f"is {w}x{h}, expected {size}x{size}")]
    problems = []
    if (p.meta.get("width"), p.meta.get("height")) != (size, size):
        problems.append(("meta", f"meta size {p.meta.get('width')}x{p.meta.get('height')}"))
    return pixels, problems


def check_pixels(
    sample_id: str, prot: np.ndarray, clean: np.ndarray, bound: float, ctx: Context
) -> tuple[int, list[tuple[str, str]]]:
    """L-inf distance of the pair (and its check against ``bound``) plus the noise.npy check."""
    delta = prot.astype(np.int16) - clean.astype(np.int16)
    linf = int(np.abs(delta).max())
    problems = []
    if linf > bound:
        where = np.unravel_index(int(np.abs(delta).argmax()), delta.shape)
        problems.append(("linf", f"L-inf {linf} > {bound:g} at (c,y,x)={tuple(map(int, where))}"))
    if ctx.noise is not None:
        row = ctx.noise_row.get(sample_id)
        if row is None:
            problems.append(("noise", "id not in triggers.json, so no noise.npy row"))
        else:
            rebuilt = np.clip(clean.astype(np.int16) + ctx.noise[row].astype(np.int16), 0, 255)
            n_diff = int(np.count_nonzero(rebuilt != prot))
            if n_diff:
                problems.append(("noise", f"clip(clean + noise.npy[{row}]) differs in {n_diff} px"))
    return linf, problems


@dataclass
class Trigger:
    """The trigger a protected sample must carry: from triggers.json, else read off its captions."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    word: Any = 0  # word position; anything else is reported by the caption check


def expected_trigger(c: Sample, p: Sample, ctx: Context) -> Trigger:
    """With the private folder: triggers.json's row of ``p.id``. Without it the public set does
    not name the trigger (docs/threat-model.md): the words inserted into the clean captions,
    the same at the same word of every caption, are taken as the trigger."""
    if ctx.triggers is not None:
        text, ids = ctx.triggers.get(p.id, ("", []))
        word = ctx.words.get(p.id, 0) if ctx.words is not None and text else 0
        return Trigger(text, list(ids), word)
    text, word = infer_trigger(c.captions, p.captions)
    if not text:
        return Trigger()
    from mme.models import token_ids

    return Trigger(text, token_ids(ctx.tokenizer, [text])[0], word)


def infer_trigger(clean: list[str], protected: list[str]) -> tuple[str, int]:
    """``(text, word)`` such that ``protected_caption(text, c, word)`` gives every protected
    caption from its clean one; ``("", 0)`` when there is none (the caption check reports it)."""
    from mme.protection.methods.triggers import protected_caption, word_starts

    if not clean or len(clean) != len(protected) or list(clean) == list(protected):
        return "", 0
    c0, p0 = clean[0], protected[0]
    starts = word_starts(c0)
    most = max(len(word_starts(c)) for c in clean)  # past c0's end: appended to c0 only
    for word in range(most + 1):  # the three layouts of protected_caption
        if word == 0:
            head, tail = "", " " + c0
        elif word < len(starts):
            head, tail = c0[: starts[word]], " " + c0[starts[word] :]
        else:
            head, tail = c0 + " ", ""
        if not (p0.startswith(head) and p0.endswith(tail)) or len(p0) <= len(head) + len(tail):
            continue
        text = p0[len(head) : len(p0) - len(tail)]
        if text.strip() == text and all(
            protected_caption(text, c, word) == q for c, q in zip(clean, protected, strict=True)
        ):
            return text, word
    return "", 0


def check_trigger(p: Sample, t: Trigger, ctx: Context) -> list[tuple[str, str]]:
    """The expected trigger: consistent, right length, an exact tokenizer round trip; and no
    public meta key that names it (:data:`mme.shards.PRIVATE_META`)."""
    problems = []
    leaked = sorted(k for k in PRIVATE_META if k in p.meta)
    if leaked:
        problems.append(("meta", f"public meta names {leaked}: private only (re-run mme poison)"))
    flag = ctx.protect.get(p.id) if ctx.protect is not None else None
    if bool(t.text) != bool(t.ids):
        problems.append(("trigger", f"trigger_text {t.text!r} but trigger_ids {t.ids}"))
    if t.text and flag is False:
        problems.append(("trigger", "unprotected sample carries a trigger"))
    if t.text and ctx.trigger_len == 0:
        problems.append(("trigger", f"captions carry {t.text!r} but the set has no trigger"))
    if t.text and ctx.trigger_len and len(t.ids) != ctx.trigger_len:
        problems.append(("trigger", f"{len(t.ids)} trigger ids, config says {ctx.trigger_len}"))
    if t.text:
        from mme.models import token_ids

        got = token_ids(ctx.tokenizer, [t.text])[0]
        if got != t.ids:
            problems.append(("trigger", f"{t.text!r} tokenizes to {got}, not {t.ids}"))
    return problems


def check_captions(c: Sample, p: Sample, t: Trigger, ctx: Context) -> list[tuple[str, str]]:
    """Protected captions = clean captions with the trigger inserted before word
    ``t.word``, and each tokenizes with the trigger ids at that word's token column."""
    from mme.protection.methods.triggers import protected_caption, token_offsets

    text, ids, word = t.text, t.ids, t.word
    if type(word) is not int or word < 0:
        return [("caption", f"trigger_word {word!r} is not a word position")]
    expected = [protected_caption(text, cap, word) for cap in c.captions]
    if len(p.captions) != len(expected):
        return [("caption", f"{len(p.captions)} captions, clean has {len(expected)}")]
    for i, (got, want) in enumerate(zip(p.captions, expected, strict=True)):
        if got != want:
            return [("caption", f"caption {i} is {got[:60]!r}, expected {want[:60]!r}")]
    if text:
        from mme.models import token_ids

        for i, row in enumerate(token_ids(ctx.tokenizer, p.captions)):
            offs = token_offsets(ctx.tokenizer, c.captions[i]) if word else [1]
            at = offs[min(word, len(offs) - 1)] - 1  # token_ids drops the start token
            if row[at : at + len(ids)] != ids:
                got = row[at : at + len(ids)]
                return [("caption", f"caption {i} has tokens {got} at {at + 1}, not {ids}")]
    return []


@dataclass
class PairResult:
    """What the checks of one pair found (computed in a worker process, applied in order)."""

    sample_id: str
    problems: list[tuple[str, str]]
    with_noise: bool
    linf: int | None = None
    psnr: float | None = None
    ssim: float | None = None


def examine(c: Sample, p: Sample, ctx: Context) -> PairResult:
    """All per-pair checks, as a :class:`PairResult` (no shared state: runs in any process)."""
    prot, problems = check_image(p, ctx.size)
    if p.meta.get("sha256") != sha256_bytes(p.image_bytes):
        problems.append(("meta", "sha256 does not match the image bytes"))
    # which images carry noise is private: without triggers.json every image is held to ε
    flag = ctx.protect.get(p.id) if ctx.protect is not None else None
    res = PairResult(p.id, problems, flag is not False)
    if prot is not None:
        clean = to_working_resolution(c.image_bytes, ctx.size)
        bound = ctx.epsilon if res.with_noise else 0  # an unprotected image must be the clean one
        res.linf, pixel_problems = check_pixels(p.id, prot, clean, bound, ctx)
        problems += pixel_problems
        if flag is None:  # no flag to go by: the images that differ from their clean one
            res.with_noise = res.linf > 0
        if res.with_noise:  # unprotected pairs are identical when valid: inf dB would hide the rest
            res.psnr, res.ssim = psnr(clean, prot), ssim(clean, prot)
    trigger = expected_trigger(c, p, ctx)
    problems += check_trigger(p, trigger, ctx) + check_captions(c, p, trigger, ctx)
    problems += check_protects(res, flag, trigger, ctx)
    return res


def check_protects(
    res: PairResult, flag: bool | None, trigger: Trigger, ctx: Context
) -> list[tuple[str, str]]:
    """A protected sample must protect: its image differs from the clean one (a noise store
    never written gives back the clean images) and, for a method with a trigger, its captions
    carry one of the configured length. Protected: ``triggers.json`` says so, or without it the
    image differs or its captions carry a trigger."""
    protected = flag is True or (flag is None and (bool(res.linf) or bool(trigger.text)))
    problems = []
    if protected and res.linf == 0:
        problems.append(("noise", "protected image equals its clean source: no noise"))
    if protected and ctx.trigger_len and not trigger.ids:
        problems.append(("trigger", f"protected sample carries no trigger ({ctx.trigger_len} ids)"))
    return problems


def apply_result(res: PairResult, report: VerifyReport) -> None:
    report.n_with_noise += res.with_noise
    if res.linf is not None:
        report.max_linf = max(report.max_linf, res.linf)
    if res.psnr is not None:
        report.psnr.add(res.psnr)
        report.ssim.add(res.ssim)
    for kind, detail in res.problems:
        report.add(res.sample_id, kind, detail)
    report.n_checked += 1


def trigger_table(t: dict[str, Any], protect: dict[str, bool]) -> dict[str, tuple[str, list]]:
    """id -> (trigger_text, trigger_ids) that the meta must carry, from triggers.json.

    Methods without triggers write empty ``trigger_ids`` / ``trigger_text`` lists; unprotected
    rows keep the trigger they were given but must not carry one in the set.
    """
    if not t["trigger_ids"]:
        return {i: ("", []) for i in t["ids"]}
    rows = zip(t["ids"], t["trigger_text"], t["trigger_ids"], strict=True)
    return {i: (text, list(ids)) if protect[i] else ("", []) for i, text, ids in rows}


def _recorded_length(t: dict[str, Any], ctx: Context, errors: list[str]) -> None:
    """The trigger length the run recorded privately is the one to check (the public manifest
    could be edited); a manifest that says otherwise is an error."""
    recorded = t.get("trigger_len")
    if recorded is None:  # runs before it was recorded: none for a method without triggers
        if t.get("trigger_ids") == []:
            ctx.trigger_len = 0
        return
    if recorded != ctx.trigger_len:
        errors.append(f"manifest says trigger_len {ctx.trigger_len}, the run recorded {recorded}")
    ctx.trigger_len = int(recorded)


def build_context(
    private: Path | None, manifest: dict[str, Any], eps: float, errors: list[str]
) -> Context:
    """Settings of the run plus, from the ``private`` folder, triggers.json (id -> trigger) and
    noise.npy (memory-mapped, with its id -> row map); unusable ones become set-level ``errors``."""
    cfg = manifest.get("config", {})
    if "working_size" not in manifest:
        raise ConfigError("the protected manifest.json has no working_size")
    size = int(manifest["working_size"])
    from mme.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.get("model") or "ViT-B-32")
    trigger_len = Manifest.model_validate(manifest).trigger_len  # one value (0: baselines)
    ctx = Context(size, eps, trigger_len, tokenizer)
    if private is None:
        return ctx
    tpath, npath = private / "triggers.json", private / "noise.npy"
    if not tpath.exists():
        errors.append(f"private folder {private} has no triggers.json")
        return ctx
    try:
        t = json.loads(tpath.read_text())
        _recorded_length(t, ctx, errors)
        ctx.protect = dict(zip(t["ids"], t.get("protected") or [True] * len(t["ids"]), strict=True))
        ctx.triggers = trigger_table(t, ctx.protect)
        if "trigger_word" in t:
            ctx.words = dict(zip(t["ids"], t["trigger_word"], strict=True))
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        errors.append(f"triggers.json is malformed: {str(err)[:200]!r}")
        return ctx
    if not npath.exists():
        errors.append(f"private folder {private} has no noise.npy")
        return ctx
    try:  # allow_pickle stays False: a planted object array is refused, not unpickled
        noise = np.load(npath, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        errors.append(f"noise.npy is unreadable: {err}")
        return ctx
    n = len(t["ids"])
    if noise.ndim != 4 or noise.shape[1:] != (3, size, size) or len(noise) != n:
        errors.append(f"noise.npy has shape {noise.shape}, expected ({n}, 3, {size}, {size})")
        return ctx
    ctx.noise, ctx.noise_row = noise, {i: r for r, i in enumerate(t["ids"])}
    return ctx
