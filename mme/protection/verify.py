"""``mme verify``: check a protected set against the clean set it was made from.

For every image of the clean train split there must be exactly one protected sample with the same
id, and for each pair:

- ``image``: the protected image is a decodable PNG of the working size ``S × S`` (meta agrees);
- ``linf``: ``max |protected - clean_at_S|`` ≤ ε in 0–255 units (0 for a sample that
  ``triggers.json`` marks unprotected), where
  ``clean_at_S = imageops.to_working_resolution(clean, S)``;
- ``noise``: with the PRIVATE folder of the run (``--private``: ``noise.npy`` +
  ``triggers.json``), ``clip(clean_at_S + δ)`` is exactly the protected image;
- ``trigger``: the image's trigger encodes to exactly its ids with the model's tokenizer and has
  the configured length (none for a method without trigger, or an unprotected image). The public
  set does not name the trigger (docs/threat-model.md): with the private folder it is
  ``triggers.json``'s row of the image (text, ids, word ``trigger_word``); without it, the words
  inserted at the same word of every clean caption (:func:`infer_trigger`);
- ``caption``: the protected captions are the clean captions in order with that trigger
  inserted before its word (0, the first word, when ``triggers.json`` has no ``trigger_word``;
  the clean captions themselves when there is no trigger), and each tokenizes with the trigger
  ids at that word's token position — what a victim's tokenizer will actually see;
- ``meta``: the stored sha256 matches the image bytes, and the public meta holds none of
  :data:`mme.shards.PRIVATE_META` (a set made before those keys became private fails here).

``--native DIR`` also checks an ``mme export --native`` folder at the originals' own size
(:func:`mme.protection.native.verify_native`: every clean image present, same width × height,
L∞ ≤ ε).

Ids in one set only are ``missing`` / ``extra``; a repeated protected id is a ``duplicate``.
Without the private folder the checks run on the clean and the public set alone (what a third
party holding the clean originals can check), and the report lists what that leaves out
(:data:`NEEDS_PRIVATE`): the ``noise`` check, the agreement of each trigger and its word with
``triggers.json``, and which images are unprotected (``protect_fraction`` < 1: the public meta no
longer says so), so every image is held to ε, none to 0.
PSNR and SSIM (min/mean/max over the protected pairs: ``triggers.json``'s flag, or without it
the pairs that differ) describe how visible the noise is. Both shard sets
are streamed side by side; only samples whose partner has not been seen yet are buffered, so an
in-order pair of sets needs O(1) memory and an out-of-order one still verifies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mme import arguments
from mme.config import ConfigError
from mme.imageops import psnr, ssim, to_working_resolution
from mme.manifest import Manifest
from mme.shards import (
    PRIVATE_META,
    BadShard,
    Sample,
    iter_samples,
    load_manifest,
    sha256_bytes,
    shard_paths,
    write_json_atomic,
)

SPLIT = "train"
KINDS = ("missing", "extra", "duplicate", "image", "linf", "noise", "trigger", "caption", "meta")
# what only the private folder can tell (the public set names no trigger and no protected flag)
NEEDS_PRIVATE = (
    "that each trigger is the one triggers.json records, at its recorded word",
    "that unprotected images (protect_fraction < 1) equal their clean one: all held to eps",
    "that clip(clean + noise.npy) is exactly the protected image",
)
SHOW_IDS = 20  # offending ids listed per check in the table; the JSON report has all of them
SHOW_DETAILS = 5  # example messages kept per check
VERIFY_CHUNK = 32  # pairs per task handed to a worker process


@dataclass
class Summary:
    """Running min / mean / max of one per-image quantity (``inf`` values included)."""

    n: int = 0
    min: float = math.inf
    max: float = -math.inf
    total: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.min, self.max = min(self.min, value), max(self.max, value)
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0, "min": None, "mean": None, "max": None}
        return {"n": self.n, "min": _num(self.min), "mean": _num(self.mean), "max": _num(self.max)}


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``ok`` iff there is no violation and no set-level error."""

    clean: str
    protected: str
    method: str
    model: str
    epsilon: float
    working_size: int
    n_clean: int = 0
    n_protected: int = 0
    n_checked: int = 0
    n_with_noise: int = 0  # protected pairs (triggers.json; without it: pairs that differ)
    max_linf: int = 0
    noise_checked: bool = False
    private_checked: bool = False  # triggers.json read: triggers and protected flags checked
    psnr: Summary = field(default_factory=Summary)
    ssim: Summary = field(default_factory=Summary)
    violations: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    details: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: list[str] = field(default_factory=list)  # set-level problems (counts, noise.npy)

    def add(self, sample_id: str, kind: str, detail: str) -> None:
        """Record one violation (an id is listed once per kind)."""
        ids = self.violations[kind]
        if not ids or ids[-1] != sample_id:
            ids.append(sample_id)
        if len(self.details[kind]) < SHOW_DETAILS:
            self.details[kind].append(f"{sample_id}: {detail}")

    @property
    def offending_ids(self) -> list[str]:
        """Ids with any violation, each once: by check (``KINDS`` order), then as seen."""
        return list(dict.fromkeys(i for k in KINDS for i in self.violations[k]))

    @property
    def ok(self) -> bool:
        return not self.errors and not self.offending_ids

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (strict JSON: an infinite PSNR is written as the string ``"inf"``)."""
        out = asdict(self)
        out["psnr"], out["ssim"] = self.psnr.to_dict(), self.ssim.to_dict()
        out.update(ok=self.ok, offending_ids=self.offending_ids)
        return out

    def table(self) -> str:
        """Human summary: settings, counts, image quality, one line per check, the verdict."""
        status = "OK" if self.ok else "FAILED"
        lines = [
            f"mme verify: {self.protected}  vs  clean {self.clean}",
            f"  method {self.method}   eps {self.epsilon:g}/255 (L-inf, pixels)   "
            f"size {self.working_size}   tokenizer {self.model}",
            f"  images   clean {self.n_clean}   protected {self.n_protected}   "
            f"checked {self.n_checked}   with noise {self.n_with_noise}",
            f"  L-inf    max {self.max_linf} (bound {self.epsilon:g})",
            _summary_line("PSNR dB", self.psnr, ".2f"),
            _summary_line("SSIM", self.ssim, ".4f"),
            f"  {'check':<10}{'violations':>10}  ids",
        ]
        for kind in KINDS:
            if kind == "noise" and not self.noise_checked:
                lines.append(f"  {kind:<10}{'-':>10}  (no private folder: --private DIR)")
                continue
            if kind == "trigger" and not self.private_checked:
                lines.append(f"  {'':14}(no private folder: trigger read off the captions)")
            ids = self.violations[kind]
            lines.append(f"  {kind:<10}{len(ids):>10}  {list_ids(ids)}".rstrip())
            lines += [f"{'':14}e.g. {d}" for d in self.details[kind][:2]]
        if not self.private_checked:
            lines += [f"  not checked (needs --private): {n}" for n in NEEDS_PRIVATE]
        lines += [f"  error: {e}" for e in self.errors]
        n_bad = len(self.offending_ids)
        lines.append(f"  result: {status}" + (f" ({n_bad} offending ids)" if n_bad else ""))
        return "\n".join(lines)


def list_ids(ids: list[str], limit: int = SHOW_IDS) -> str:
    """``"a, b, c"``, or the first ``limit`` ids and ``" (+N more)"``."""
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _summary_line(name: str, s: Summary, fmt: str) -> str:
    if not s.n:
        return f"  {name:<8} (no protected images)"
    return f"  {name:<8} min {s.min:{fmt}}   mean {s.mean:{fmt}}   max {s.max:{fmt}}   (n={s.n})"


# --------------------------------------------------------------------------------- checks


@dataclass
class _Context:
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


def _check_image(p: Sample, size: int) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
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


def _check_pixels(
    sample_id: str, prot: np.ndarray, clean: np.ndarray, bound: float, ctx: _Context
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
class _Trigger:
    """The trigger a protected sample must carry: from triggers.json, else read off its captions."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    word: Any = 0  # word position; anything else is reported by the caption check


def _expected_trigger(c: Sample, p: Sample, ctx: _Context) -> _Trigger:
    """With the private folder: triggers.json's row of ``p.id``. Without it the public set does
    not name the trigger (docs/threat-model.md): the words inserted into the clean captions,
    the same at the same word of every caption, are taken as the trigger."""
    if ctx.triggers is not None:
        text, ids = ctx.triggers.get(p.id, ("", []))
        word = ctx.words.get(p.id, 0) if ctx.words is not None and text else 0
        return _Trigger(text, list(ids), word)
    text, word = infer_trigger(c.captions, p.captions)
    if not text:
        return _Trigger()
    from mme.models import token_ids

    return _Trigger(text, token_ids(ctx.tokenizer, [text])[0], word)


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


def _check_trigger(p: Sample, t: _Trigger, ctx: _Context) -> list[tuple[str, str]]:
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


def _check_captions(c: Sample, p: Sample, t: _Trigger, ctx: _Context) -> list[tuple[str, str]]:
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
class _PairResult:
    """What the checks of one pair found (computed in a worker process, applied in order)."""

    sample_id: str
    problems: list[tuple[str, str]]
    with_noise: bool
    linf: int | None = None
    psnr: float | None = None
    ssim: float | None = None


def _examine(c: Sample, p: Sample, ctx: _Context) -> _PairResult:
    """All per-pair checks, as a :class:`_PairResult` (no shared state: runs in any process)."""
    prot, problems = _check_image(p, ctx.size)
    if p.meta.get("sha256") != sha256_bytes(p.image_bytes):
        problems.append(("meta", "sha256 does not match the image bytes"))
    # which images carry noise is private: without triggers.json every image is held to ε
    flag = ctx.protect.get(p.id) if ctx.protect is not None else None
    res = _PairResult(p.id, problems, flag is not False)
    if prot is not None:
        clean = to_working_resolution(c.image_bytes, ctx.size)
        bound = ctx.epsilon if res.with_noise else 0  # an unprotected image must be the clean one
        res.linf, pixel_problems = _check_pixels(p.id, prot, clean, bound, ctx)
        problems += pixel_problems
        if flag is None:  # no flag to go by: the images that differ from their clean one
            res.with_noise = res.linf > 0
        if res.with_noise:  # unprotected pairs are identical when valid: inf dB would hide the rest
            res.psnr, res.ssim = psnr(clean, prot), ssim(clean, prot)
    trigger = _expected_trigger(c, p, ctx)
    problems += _check_trigger(p, trigger, ctx) + _check_captions(c, p, trigger, ctx)
    return res


def _apply(res: _PairResult, report: VerifyReport) -> None:
    report.n_with_noise += res.with_noise
    if res.linf is not None:
        report.max_linf = max(report.max_linf, res.linf)
    if res.psnr is not None:
        report.psnr.add(res.psnr)
        report.ssim.add(res.ssim)
    for kind, detail in res.problems:
        report.add(res.sample_id, kind, detail)
    report.n_checked += 1


_WORKER_CTX: list[_Context] = []  # the context of a worker process, built once by _init_worker


def _init_worker(private: Path | None, manifest: dict[str, Any], eps: float) -> None:
    _WORKER_CTX[:] = [_context(private, manifest, eps, [])]


def _examine_chunk(pairs: list[tuple[Sample, Sample]]) -> list[_PairResult]:
    return [_examine(c, p, _WORKER_CTX[0]) for c, p in pairs]


def _chunks(pairs: Iterator[tuple[Sample, Sample]], size: int) -> Iterator[list]:
    chunk: list[tuple[Sample, Sample]] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _results(
    pairs: Iterator[tuple[Sample, Sample]], ctx: _Context, workers: int, init: tuple
) -> Iterator[_PairResult]:
    """Results of every pair, in pair order; ``workers`` > 1 checks chunks in that many
    processes (each rebuilds the context from ``init``), so the report is the same."""
    if workers <= 1:
        yield from (_examine(c, p, ctx) for c, p in pairs)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init) as pool:
        # a bounded window of chunks in flight keeps memory flat on large sets
        pending: deque = deque()
        for chunk in _chunks(pairs, VERIFY_CHUNK):
            pending.append(pool.submit(_examine_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ----------------------------------------------------------------------------- the run


def _pairs(
    clean: Iterator[Sample], protected: Iterator[Sample], report: VerifyReport
) -> Iterator[tuple[Sample, Sample]]:
    """Match clean and protected samples by id while streaming both.

    A sample waits in a buffer only until its partner arrives, so sets in the same order (what
    ``mme poison`` writes) pass through with a buffer of at most one sample per side. Unmatched
    leftovers become ``missing`` / ``extra``; a repeated protected id is a ``duplicate``.
    """
    waiting_c: dict[str, Sample] = {}
    waiting_p: dict[str, Sample] = {}
    seen_p: set[str] = set()
    for c, p in zip_longest(clean, protected):
        if c is not None:
            report.n_clean += 1
            if c.id in waiting_p:
                yield c, waiting_p.pop(c.id)
            else:
                waiting_c[c.id] = c
        if p is not None:
            report.n_protected += 1
            if p.id in seen_p:
                report.add(p.id, "duplicate", "id occurs more than once in the protected set")
                continue
            seen_p.add(p.id)
            if p.id in waiting_c:
                yield waiting_c.pop(p.id), p
            else:
                waiting_p[p.id] = p
    for sample_id in waiting_c:
        report.add(sample_id, "missing", "in the clean train split, not in the protected set")
    for sample_id in waiting_p:
        report.add(sample_id, "extra", "in the protected set, not in the clean train split")


def _require(folder: Path, what: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``folder``; FileNotFoundError with a clear message if anything is absent."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} not found")
    manifest = manifest if manifest is not None else load_manifest(folder)
    if not shard_paths(folder, SPLIT):
        raise FileNotFoundError(f"{what} folder {folder} has no {SPLIT}-*.tar shards")
    return manifest


def _trigger_table(t: dict[str, Any], protect: dict[str, bool]) -> dict[str, tuple[str, list]]:
    """id -> (trigger_text, trigger_ids) that the meta must carry, from triggers.json.

    Methods without triggers write empty ``trigger_ids`` / ``trigger_text`` lists; unprotected
    rows keep the trigger they were given but must not carry one in the set.
    """
    if not t["trigger_ids"]:
        return {i: ("", []) for i in t["ids"]}
    rows = zip(t["ids"], t["trigger_text"], t["trigger_ids"], strict=True)
    return {i: (text, list(ids)) if protect[i] else ("", []) for i, text, ids in rows}


def _context(
    private: Path | None, manifest: dict[str, Any], eps: float, errors: list[str]
) -> _Context:
    """Settings of the run plus, from the ``private`` folder, triggers.json (id -> trigger) and
    noise.npy (memory-mapped, with its id -> row map); unusable ones become set-level ``errors``."""
    cfg = manifest.get("config", {})
    if "working_size" not in manifest:
        raise ConfigError("the protected manifest.json has no working_size")
    size = int(manifest["working_size"])
    from mme.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.get("model") or "ViT-B-32")
    trigger_len = Manifest.model_validate(manifest).trigger_len  # one value (0: baselines)
    ctx = _Context(size, eps, trigger_len, tokenizer)
    if private is None:
        return ctx
    tpath, npath = private / "triggers.json", private / "noise.npy"
    if not tpath.exists():
        errors.append(f"private folder {private} has no triggers.json")
        return ctx
    try:
        t = json.loads(tpath.read_text())
        ctx.protect = dict(zip(t["ids"], t.get("protected") or [True] * len(t["ids"]), strict=True))
        ctx.triggers = _trigger_table(t, ctx.protect)
        if "trigger_word" in t:
            ctx.words = dict(zip(t["ids"], t["trigger_word"], strict=True))
    except (KeyError, TypeError, ValueError) as err:
        errors.append(f"triggers.json is malformed: {err!r}")
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


def verify(
    clean: Path,
    protected: Path,
    epsilon: float | None = None,
    private: Path | None = None,
    manifest: dict[str, Any] | None = None,
    workers: int = 0,
) -> VerifyReport:
    """Check the protected set in ``protected`` against the clean shards in ``clean``.

    ``workers`` processes check the pairs (0: one per core, 1: this process); the report is
    the same either way.

    ``epsilon`` (0–255 units) overrides the manifest's ``config.epsilon``. ``private`` is the
    run's private folder (noise.npy, triggers.json) for the noise and trigger-table checks.
    ``manifest`` stands in for ``protected/manifest.json`` (``mme poison`` verifies before it
    writes one). Raises
    FileNotFoundError for a missing folder / manifest / shards and ConfigError when ε or the
    working size is unknown; every problem with the data itself is reported, not raised. See the
    module docstring for the checks.
    """
    clean, protected = Path(clean), Path(protected)
    _require(clean, "clean")
    manifest = _require(protected, "protected", manifest)
    cfg = manifest.get("config", {})
    eps = epsilon if epsilon is not None else cfg.get("epsilon")
    if eps is None:
        raise ConfigError(f"{protected}/manifest.json has no config.epsilon: pass --epsilon")
    errors: list[str] = []
    ctx = _context(Path(private) if private else None, manifest, float(eps), errors)
    report = VerifyReport(
        clean=str(clean),
        protected=str(protected),
        method=str(cfg.get("method", "?")),
        model=cfg.get("model") or "ViT-B-32",
        epsilon=float(eps),
        working_size=ctx.size,
        noise_checked=ctx.noise is not None,
        private_checked=ctx.triggers is not None,
        errors=errors,
    )
    expected = manifest.get("splits", {}).get(SPLIT, {}).get("images")
    pairs = _pairs(iter_samples(clean, SPLIT), iter_samples(protected, SPLIT), report)
    workers = workers or os.cpu_count() or 1
    if expected:  # no pool for a set that fits in one chunk
        workers = min(workers, -(-int(expected) // VERIFY_CHUNK))
    init = (Path(private) if private else None, manifest, float(eps))
    results = _results(pairs, ctx, workers, init)
    for res in tqdm(results, total=expected, desc="verify", unit="img", file=sys.stderr):
        _apply(res, report)
    if expected is not None and expected != report.n_protected:
        report.errors.append(f"manifest lists {expected} images, shards hold {report.n_protected}")
    return report


add_arguments = arguments.verify  # flags live where --help needs no torch


def _native_ok(clean: Path, folder: Path, epsilon: float) -> bool:
    """:func:`mme.protection.native.verify_native` of an exported folder, printed; True when it
    passes."""
    from mme.protection.native import verify_native

    native = verify_native(clean, folder, epsilon)
    print(f"native size: {native.n_checked} images, max L-inf {native.max_linf} (eps {epsilon:g})")
    for kind, items in native.problems.items():
        print(
            f"mme verify: native {kind}: {len(items)}: {', '.join(items[:SHOW_IDS])}",
            file=sys.stderr,
        )
    return native.ok


def run(args: argparse.Namespace) -> int:
    try:
        report = verify(args.clean, args.protected, args.epsilon, args.private)
    except (FileNotFoundError, BadShard) as err:
        print(f"mme verify: {err}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json is not None:
        write_json_atomic(args.json, report.to_dict())
    if args.native is not None and not _native_ok(args.clean, args.native, report.epsilon):
        return 1
    if not report.ok:
        ids = report.offending_ids
        reasons = ([f"{len(ids)} ids: {list_ids(ids)}"] if ids else []) + report.errors
        print(f"mme verify: FAILED for {'; '.join(reasons)}", file=sys.stderr)
        return 1
    return 0
