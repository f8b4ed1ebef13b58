"""``mme poison``: protect the train split of a clean shard folder (MEM, keyed or a baseline).

Two outputs, kept apart by design (see docs/threat-model.md):

- PUBLIC ``cfg.out``: protected ``train-*.tar`` shards with the clean ids (image = clip(x + δ) as
  PNG at the working resolution, captions = trigger words + caption, metadata) and
  ``manifest.json``, written last, only after ``mme verify`` passed. Nothing in it gives back a
  clean pixel, and nothing in its metadata says which words are the trigger, where they sit,
  or which images carry noise (no ``shards.PRIVATE_META`` key, no seed).
- PRIVATE ``cfg.private``: ``noise.npy`` (int8 pixel units, row order = ``triggers.json["ids"]``;
  protected - noise = clean), ``triggers.json`` (which images are protected), ``grid.png``
  (clean | noise amplified | protected) and ``work/`` (memory-mapped pixels and noise, per-round
  checkpoints) until success, so ``--resume`` continues a killed run. Method keyed adds
  ``keys.json`` (its key words per image) and ``patterns.npy`` (its learnt patterns).

Both folders are locked for the run (a second ``mme poison`` on them stops at once) and must be
disjoint from each other and from the clean input, which is never modified.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mme import arguments, cpuisa, distributed, fsio, guard, models, shards
from mme.config import KEYED_FIELDS, ConfigError, PoisonConfig, section_from_args
from mme.manifest import Manifest, read_manifest, write_manifest
from mme.protection.methods.keyed import Keyed
from mme.protection.methods.loop import Loop
from mme.protection.methods.mem import MEM, RoundHook
from mme.protection.methods.store import PairStore
from mme.protection.outputs import (
    PRIVATE_FILES,
    VerifiedHook,
    output_manifest,
    verify_outputs,
    write_outputs,
)
from mme.protection.resume import (
    config_hash,
    prepare_work,
    resume_from,
    save_checkpoint,
    work_dir,
)
from mme.protection.workstore import (
    check_disk,
    init_state,
    load_pairs,
    open_store,
    train_captions,
    trigger_vocabulary,
)

OWNER = "mme poison"


def check_inputs(cfg: PoisonConfig) -> Manifest:
    """Fail before any work on a bad model name or a missing/empty clean dataset."""
    try:
        models.check_model_name(cfg.model)
    except ValueError as err:
        raise ConfigError(f"poison.model = {cfg.model!r}: {err}") from None
    try:
        manifest = read_manifest(cfg.clean)
    except FileNotFoundError as err:
        raise ConfigError(f"poison.clean = {str(cfg.clean)!r}: {err}") from None
    n = manifest.images("train")
    if n == 0:
        raise ConfigError(f"poison.clean = {str(cfg.clean)!r}: the train split has no images")
    if n == 1 and cfg.method != "random":  # ClipLoss of a batch of one pair is 0: nothing moves
        raise ConfigError(
            f"poison.clean = {str(cfg.clean)!r}: the train split has 1 image; poison.method ="
            f" {cfg.method} needs at least 2 (a contrastive loss compares pairs)"
        )
    guard.check(OWNER, outputs(cfg), {"clean input": cfg.clean})  # every rank, before any work
    if cfg.work is not None:  # the store holds clean pixels: never inside the public folder
        others = {"clean input": cfg.clean, "public folder": cfg.out}
        try:
            fsio.check_disjoint(cfg.work, others, "poison.work")
        except fsio.UnsafePath as err:
            raise guard.OutputRefused(str(err)) from None
    return manifest


def outputs(cfg: PoisonConfig) -> list[guard.Folder]:
    """The run's two folders for :mod:`mme.guard`: the public one and the private one, tied
    to it (a run with another public folder may not overwrite its noise)."""
    public = guard.Folder(Path(cfg.out), "public", "poison.out")
    private = guard.Folder(Path(cfg.private), "private", "poison.private", tied_to=Path(cfg.out))
    return [public, private]


def claim_outputs(cfg: PoisonConfig) -> AbstractContextManager[guard.Claim]:
    """Lock and mark both folders; the marker's run is the result's hash (same settings and
    clean input: the same marker, so DVC sees the same folder)."""
    settings = {"config": config_hash(cfg), "clean": shards.manifest_sha256(cfg.clean)}
    return guard.claim(OWNER, outputs(cfg), {"clean input": cfg.clean}, settings=settings)


def check_world(cfg: PoisonConfig, world: distributed.World, n: int) -> None:
    """Every rank needs rows of every surrogate batch (it is split over them)."""
    if world.active and cfg.method != "random" and min(cfg.batch_size, n) < world.size:
        raise ConfigError(
            f"poison.batch_size = {cfg.batch_size} ({n} train images): {world.size} processes"
            f" split every surrogate batch, so it needs at least {world.size} images"
        )
    if world.active and cfg.method == "keyed":  # its patterns are shared by every image
        raise ConfigError("poison.method = keyed runs in one process (nproc 1, no torchrun)")


# The loop runs with exactly ``poison.threads`` torch threads: CPU kernels split reductions by
# thread count (e.g. LayerNorm's weight/bias gradients are summed one partial per thread), so
# the surrogate's weights, and through them every PGD sign and HotFlip choice, would drift with
# OMP_NUM_THREADS or the core count. A fixed count gives the same bytes on any machine with the
# same CPU instruction set (docs/orchestration.md, "Reproducibility").
fixed_threads = models.torch_threads


def make_loop(
    cfg: PoisonConfig,
    model: torch.nn.Module,
    store: PairStore,
    device: torch.device,
    allowed: torch.Tensor,
    world: distributed.World,
) -> Loop:
    """The method's rounds: :class:`Keyed` (it reads the captions for its key words) or
    :class:`MEM` (MEM and the baselines)."""
    if cfg.method == "keyed":
        caps = train_captions(cfg.clean)
        return Keyed(model, store, cfg, device, allowed, world=world, captions=caps)
    return MEM(model, store, cfg, device, allowed, world=world)


def run_rounds(
    mem: Loop,
    store: PairStore,
    cfg: PoisonConfig,
    start: int,
    on_round: RoundHook | None,
    work: Path,
) -> None:
    from mme.track import tracking

    rounds = range(start, cfg.rounds) if cfg.method != "random" else range(0)
    for r in tqdm(rounds, desc=f"{cfg.method} rounds", unit="round", file=sys.stderr):
        stats = mem.run_round(r)
        mem.history.append({"round": r, **stats})
        state = mem.state()  # a collective: every rank's state must be rank 0's
        if mem.world.main:  # one writer: the checkpoint and the log
            tracking.log_metrics(stats, step=r)
            save_checkpoint(work, mem, store, r, cfg, state)
        distributed.barrier(mem.world)  # a killed run resumes from a complete checkpoint
        tqdm.write(f"round {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if on_round is not None:
            on_round(r, stats)


def poison(
    cfg: PoisonConfig,
    resume: bool = False,
    on_round: RoundHook | None = None,
    on_verified: VerifiedHook | None = None,
) -> dict:
    """Protect ``cfg.clean``'s train split into ``cfg.out`` (public) and ``cfg.private``;
    returns the output manifest (``{}`` on ranks other than 0 under ``torchrun``).

    ``on_round(r, stats)`` runs after each round; ``on_verified(report)`` gets the
    :class:`~mme.protection.verify_report.VerifyReport` of the one check of the written set,
    before the manifest is written (or the run stops on a failed check)."""
    clean_manifest = check_inputs(cfg)
    world = distributed.init(models.resolve_device(cfg.device))
    distributed.note_nproc(world, cfg.nproc, "poison.nproc")
    check_world(cfg, world, clean_manifest.images("train"))
    if not world.main:  # rank 0 holds the locks and writes every output (mme/distributed.py)
        return _poison(cfg, clean_manifest, resume, (on_round, on_verified), world)
    with claim_outputs(cfg):
        for name in PRIVATE_FILES:  # the old layout kept them here: never again
            (Path(cfg.out) / name).unlink(missing_ok=True)
        return _poison(cfg, clean_manifest, resume, (on_round, on_verified), world)


def _poison(
    cfg: PoisonConfig,
    clean_manifest: Manifest,
    resume: bool,
    hooks: tuple[RoundHook | None, VerifiedHook | None],
    world: distributed.World,
) -> dict:
    t0 = time.perf_counter()
    on_round = hooks[0]
    if cfg.method == "random" and cfg.noise_seed is None:  # never a default: see workstore
        cfg = cfg.model_copy(update={"noise_seed": secrets.randbits(63)})
    work = prepare_work(cfg, resume, world)
    torch.manual_seed(cfg.seed)  # surrogate init: same seed, same model on every rank
    device = distributed.device_for(world, models.resolve_device(cfg.device))
    if device.type == "cpu":
        cpuisa.check(cfg.cpu_isa)  # the instruction set is part of the bytes, like the threads
    model, tokenizer = models.create_model(cfg.model, cfg.pretrained, device)
    size = models.image_size(model)
    n = clean_manifest.images("train")
    if world.main:
        check_disk(cfg, work, n, size, tokenizer.context_length, resume)
        store = load_pairs(cfg, work, tokenizer, size)
    distributed.barrier(world)
    if not world.main:
        store = open_store(cfg, work, tokenizer, size, n)
    allowed = trigger_vocabulary(cfg, store, tokenizer, model.token_embedding.num_embeddings)
    mem = make_loop(cfg, model, store, device, allowed, world)
    start = resume_from(work, mem, store, cfg) if resume else 0
    if start == 0:
        init_state(store, cfg, allowed, world)
    if not world.main:
        with fixed_threads(cfg.threads):
            run_rounds(mem, store, cfg, start, on_round, work)
        distributed.barrier(world)  # rank 0 writes the outputs from here on
        return {}
    return _rounds_and_outputs(cfg, clean_manifest, mem, store, tokenizer, start, hooks, t0)


def _rounds_and_outputs(
    cfg: PoisonConfig,
    clean_manifest: Manifest,
    mem: Loop,
    store: PairStore,
    tokenizer: Any,
    start: int,
    hooks: tuple[RoundHook | None, VerifiedHook | None],
    t0: float,
) -> dict:
    """Rank 0 (or the only process): the rounds, then the outputs, tracked in one MLflow run."""
    on_round, on_verified = hooks
    from mme.track import tracking

    work = work_dir(cfg)
    params = poison_params(cfg)
    with tracking.start_run(tracking.experiment_name(), f"poison-{cfg.method}", params):
        with fixed_threads(cfg.threads):  # the bytes must not depend on the machine's cores
            run_rounds(mem, store, cfg, start, on_round, work)
        distributed.barrier(mem.world)  # the other ranks are done with the store
        t_gen = time.perf_counter() - t0
        # while shards are being replaced no manifest may describe the folder
        (Path(cfg.out) / "manifest.json").unlink(missing_ok=True)
        records, n_captions = write_outputs(cfg, store, tokenizer)
        mem.write_private(Path(cfg.private))  # keyed: its key words and patterns
        manifest = output_manifest(cfg, clean_manifest, store, records, n_captions, mem)
        # the manifest is what makes the folder a dataset: written last, only once verified
        manifest["verify"] = verify_outputs(cfg, manifest, on_verified)
        write_manifest(cfg.out, manifest)
        seconds = {"seconds_generation": t_gen, "seconds_total": time.perf_counter() - t0}
        log_outputs(cfg, manifest, seconds)
    shutil.rmtree(work)
    print(
        f"mme poison: {cfg.out}: {manifest['n_protected']} of {store.n} images protected"
        f" ({cfg.method}, eps {cfg.epsilon:g}/255) in {seconds['seconds_total']:.0f} s;"
        f" private files (never publish): {cfg.private}",
        file=sys.stderr,
    )
    return manifest


def poison_params(cfg: PoisonConfig) -> dict[str, Any]:
    """MLflow params, with the project-wide names (``method``, ``epsilon``, ``trigger_len``,
    ``data_manifest_sha256``: the clean input's version, as its victim's train run logs it)."""
    return {
        "stage": "poison",
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "step_size": cfg.step_size,
        "pgd_steps": cfg.pgd_steps,
        "rounds": cfg.rounds,
        "surrogate_steps": cfg.surrogate_steps,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        "trigger_rounds": cfg.trigger_rounds,
        "candidates": cfg.candidates,
        "surrogate_model": cfg.model,
        "batch_size": cfg.batch_size,
        "protect_fraction": cfg.protect_fraction,
        "eot": ",".join(cfg.eot) if cfg.augment else "none",
        "eot_interpolation": cfg.eot_interpolation,
        "threads": cfg.threads,
        "cpu_isa": cfg.cpu_isa,
        "data_manifest_sha256": shards.manifest_sha256(cfg.clean),
        **({k: getattr(cfg, k) for k in KEYED_FIELDS} if cfg.method == "keyed" else {}),
    }


def log_outputs(cfg: PoisonConfig, manifest: dict, seconds: dict[str, float]) -> None:
    """Summary metrics (wall times: here and on stderr only, see :func:`output_manifest`)."""
    from mme.track import tracking

    summary = manifest["verify"]
    metrics = seconds | {k: manifest[k] for k in ("n_protected", "distinct_triggers")}
    metrics |= {
        "verify_max_linf": summary["max_linf"],
        "verify_ok": float(summary["ok"]),
    }
    for q in ("psnr", "ssim"):
        if summary[q]["n"] and summary[q]["mean"] != "inf":
            metrics[f"verify_{q}_mean"] = summary[q]["mean"]
    tracking.log_metrics(metrics)
    tracking.log_artifact(Path(cfg.out) / "manifest.json")
    for name in ("grid.png", "triggers.json"):  # the tracking store is private too
        tracking.log_artifact(Path(cfg.private) / name)


add_arguments = arguments.poison  # flags live where --help needs no torch


def run(args: argparse.Namespace) -> int:
    poison(section_from_args("poison", args), resume=args.resume)
    return 0
