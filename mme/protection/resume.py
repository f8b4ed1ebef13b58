"""``mme poison --resume``: what a run's result depends on (its hash), the work folder, and the
per-round checkpoint a killed run continues from.

A checkpoint holds the round, the config hash, the clean input's manifest hash, the store's state
(current noise buffer, triggers, protected subset) and the method's state (surrogate, optimiser,
generators); a resumed run must match the hash, the clean input and the process count.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mme import distributed, fsio, shards
from mme.config import KEYED_FIELDS, ConfigError, PoisonConfig
from mme.protection.methods.loop import Loop
from mme.protection.methods.store import PairStore

CKPT = "checkpoint.pt"


# settings that do not change the result: left out of the resume hash
NOT_IN_RESULT = {"device", "compile", "grid_samples", "shard_size", "write_workers"} | {
    "nproc",  # the resume check compares the world size itself
    "work",
    "noise_seed",  # the random baseline's: it has no rounds, so nothing to resume
}


# trigger settings added after protected sets were published: at their defaults they are left
# out of the manifest and the resume hash, so a default run keeps the bytes it had before
LATER_DEFAULTS = {"trigger_position": "start", "trigger_vocab": "any"}


def at_later_defaults(cfg: PoisonConfig) -> set[str]:
    """The later settings left out of ``cfg``'s manifest and resume hash: those at their
    defaults, and the keyed method's own for any other method."""
    keep = set() if cfg.method == "keyed" else set(KEYED_FIELDS)
    return keep | {k for k, v in LATER_DEFAULTS.items() if getattr(cfg, k) == v}


def config_hash(cfg: PoisonConfig) -> str:
    """Hash of what determines the result (a resumed run must match it)."""
    exclude = NOT_IN_RESULT | {"out", "private"} | at_later_defaults(cfg)
    keep = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def work_dir(cfg: PoisonConfig) -> Path:
    """The memory-mapped store and checkpoints: ``<private>/work``, or a subfolder of
    ``poison.work`` (e.g. a local NVMe disk) named after the private folder, so that the run
    only ever creates and removes its own folder there."""
    if cfg.work is None:
        return Path(cfg.private) / "work"
    key = hashlib.sha256(str(Path(cfg.private).resolve()).encode()).hexdigest()[:12]
    return Path(cfg.work) / f"mme-poison-{key}"


def prepare_work(cfg: PoisonConfig, resume: bool, world: distributed.World) -> Path:
    """Rank 0 empties (or, resuming, keeps) the work folder; the others wait for it."""
    work = work_dir(cfg)
    if world.main:
        if not resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier(world)
    return work


def save_checkpoint(
    work: Path,
    mem: Loop,
    store: PairStore,
    r: int,
    cfg: PoisonConfig,
    state: dict[str, Any] | None = None,
) -> None:
    ckpt = {
        "round": r,
        "config_hash": config_hash(cfg),
        "clean_manifest_sha256": shards.manifest_sha256(cfg.clean),
        "current": store.current,
        "triggers": store.triggers,
        "protect": store.protect,
        "mem": state if state is not None else mem.state(),
        "stats": mem.history,
    }
    if mem.world.active:  # the bytes depend on N (float rounding): resume with the same N
        ckpt["world_size"] = mem.world.size
    with fsio.atomic_open(work / CKPT) as f:
        torch.save(ckpt, f)


def resume_from(work: Path, mem: Loop, store: PairStore, cfg: PoisonConfig) -> int:
    """Restore the last finished round; returns the round to start with."""
    path = work / CKPT
    if not path.exists():
        print(f"mme poison: --resume: no checkpoint in {work}, starting fresh", file=sys.stderr)
        return 0
    try:  # weights_only: tensors and plain containers only, a planted pickle runs no code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...: all "not ours"
        msg = f"--resume: {path} is not a checkpoint mme can load safely: {err}"
        raise ConfigError(msg) from None
    if not isinstance(ckpt, dict) or ckpt.get("config_hash") != config_hash(cfg):
        raise ConfigError(f"--resume: {path} was made with other settings; remove it or match them")
    if ckpt.get("clean_manifest_sha256") != shards.manifest_sha256(cfg.clean):
        raise ConfigError(
            f"--resume: {path} was made from another version of {cfg.clean} (its manifest.json"
            " changed since): start afresh without --resume"
        )
    if ckpt.get("world_size", 1) != mem.world.size:
        raise ConfigError(
            f"--resume: {path} was made by {ckpt.get('world_size', 1)} process(es), this run has"
            f" {mem.world.size}: resume with the same torchrun --nproc_per_node"
        )
    store.current, store.triggers, store.protect = (
        ckpt["current"],
        ckpt["triggers"],
        ckpt["protect"],
    )
    mem.load_state(ckpt["mem"])
    mem.history = ckpt["stats"]
    return ckpt["round"] + 1
