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
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import zip_longest
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme import arguments, guard
from mme.config import ConfigError
from mme.protection.verify_checks import Context, PairResult, apply_result, build_context, examine
from mme.protection.verify_report import SHOW_IDS, VerifyReport, list_ids
from mme.shards import (
    BadShard,
    Sample,
    iter_samples,
    load_manifest,
    shard_paths,
    write_json_atomic,
)

SPLIT = "train"


VERIFY_CHUNK = 32  # pairs per task handed to a worker process


_WORKER_CTX: list[Context] = []  # the context of a worker process, built once by _init_worker


def _init_worker(private: Path | None, manifest: dict[str, Any], eps: float) -> None:
    _WORKER_CTX[:] = [build_context(private, manifest, eps, [])]


def _examine_chunk(pairs: list[tuple[Sample, Sample]]) -> list[PairResult]:
    return [examine(c, p, _WORKER_CTX[0]) for c, p in pairs]


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
    pairs: Iterator[tuple[Sample, Sample]], ctx: Context, workers: int, init: tuple
) -> Iterator[PairResult]:
    """Results of every pair, in pair order; ``workers`` > 1 checks chunks in that many
    processes (each rebuilds the context from ``init``), so the report is the same."""
    if workers <= 1:
        yield from (examine(c, p, ctx) for c, p in pairs)
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

    ``epsilon`` (0–255 units) is the bound to check; without it, the one the run recorded in
    ``private/triggers.json`` (:func:`bound`). ``private`` is the run's private folder
    (noise.npy, triggers.json) for the noise and trigger-table checks.
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
    errors: list[str] = []
    eps = bound(epsilon, Path(private) if private else None, cfg.get("epsilon"), errors)
    ctx = build_context(Path(private) if private else None, manifest, float(eps), errors)
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
        apply_result(res, report)
    if expected is not None and expected != report.n_protected:
        report.errors.append(f"manifest lists {expected} images, shards hold {report.n_protected}")
    if report.n_checked and not report.n_with_noise:
        report.errors.append("no image differs from its clean source: the set protects nothing")
    return report


def bound(epsilon: float | None, private: Path | None, claimed: Any, errors: list[str]) -> float:
    """The ε to check: ``--epsilon``, else the one the run recorded in its private
    ``triggers.json``; never the set's own claim alone (an edited manifest would raise its own
    bound). A claim that differs from the run's record is an error of the set. (A private folder
    of a run made before ε was recorded there: the claim, checked against ``noise.npy``.)"""
    recorded = None
    if private is not None:
        try:
            record = json.loads((private / "triggers.json").read_bytes()[: 1 << 26])
            recorded = record.get("epsilon", claimed)
        except (OSError, ValueError, AttributeError, RecursionError):
            recorded = claimed  # reported as a malformed triggers.json by the checks
    if recorded is not None and claimed is not None and float(claimed) != float(recorded):
        errors.append(f"manifest claims epsilon {claimed}, the run recorded {recorded}")
    eps = epsilon if epsilon is not None else recorded
    if not isinstance(eps, int | float) or isinstance(eps, bool):
        raise ConfigError(
            f"pass --epsilon E, the L-inf bound to check (or --private with the run's"
            f" triggers.json): the set's own manifest (epsilon {claimed}) cannot vouch for itself"
        )
    return float(eps)


add_arguments = arguments.verify  # flags live where --help needs no torch


def _native_ok(clean: Path, folder: Path, epsilon: float, private: Path | None) -> bool:
    """:func:`mme.protection.native.verify_native` of a published folder, printed; True when it
    passes."""
    from mme.protection.native import verify_native

    native = verify_native(clean, folder, epsilon, private=private)
    kept = "" if native.kept_min is None else f", JPEGs keep >= {native.kept_min:.0%} of the noise"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(native.formats.items()))
    print(
        f"native size: {native.n_checked} images ({kinds}), max L-inf {native.max_linf} "
        f"(eps {epsilon:g}){kept}"
    )
    for kind, items in native.problems.items():
        print(
            f"mme verify: native {kind}: {len(items)}: {', '.join(items[:SHOW_IDS])}",
            file=sys.stderr,
        )
    return native.ok


def _run_folders(args: argparse.Namespace) -> None:
    """``--run PRIVATE`` (an ``mme protect`` private area) fills in the folders not given."""
    if args.run is not None:
        args.clean = args.clean or args.run / "clean"
        args.protected = args.protected or args.run / "protected"
        args.private = args.private or args.run / "noise"
    if args.clean is None or args.protected is None:
        raise ConfigError(
            "give --clean and --protected (or --run, the private area of an mme protect run)"
        )


def run(args: argparse.Namespace) -> int:
    _run_folders(args)
    if args.json is not None:  # a report replaces only an earlier report, never an input
        inputs = {"--clean": args.clean, "--protected": args.protected, "--private": args.private}
        report_file = guard.File(args.json, guard.json_object_with("ok", "n_checked"), "--json")
        guard.check("mme verify", [report_file], {**inputs, "--native": args.native})
    try:
        report = verify(args.clean, args.protected, args.epsilon, args.private)
    except (FileNotFoundError, BadShard) as err:
        print(f"mme verify: {err}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json is not None:
        write_json_atomic(args.json, report.to_dict())
    native = args.native
    try:
        if native is not None and not _native_ok(args.clean, native, report.epsilon, args.private):
            return 1
    except (ValueError, OSError) as err:  # a metadata.jsonl naming a path outside, junk in it
        print(f"mme verify: --native {native}: {err}", file=sys.stderr)
        return 2
    if not report.ok:
        ids = report.offending_ids
        reasons = ([f"{len(ids)} ids: {list_ids(ids)}"] if ids else []) + report.errors
        print(f"mme verify: FAILED for {'; '.join(reasons)}", file=sys.stderr)
        return 1
    return 0
