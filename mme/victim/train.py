"""``mme train``: train a victim CLIP on shards with ``open_clip_train``, the community trainer.

We do not write a training loop: :func:`train_victim` runs ``open_clip_train`` in-process through
its adapter, :mod:`mme.victim.open_clip_adapter`, and only prepares its input and collects its
output.

Input. Our shards hold one sample per image with all its captions in one ``txt``, one per line;
open_clip_train takes each sample's ``txt`` as ONE caption. Two ways to feed it (``view``):

- ``images`` (default): the trainer reads our shards as they are; its tokenizer is wrapped so
  that it tokenizes one caption of the sample, drawn at random (seeded) each time the image is
  drawn. An epoch is still as long as the number of captions (``--train-num-samples``), so the
  trainer passes over the images about once per caption, each time with a fresh draw. Nothing
  is copied, and each image is decoded once per draw as before.
- ``pairs``: a "pairs" view is written first: one sample per (image, caption), key
  ``{id}_c{j}``, caption-major (all first captions, then all second captions, ...) so that one
  image's captions sit far apart in the stream, like the paper's shuffled per-caption rows. It
  copies every image once per caption; it is deleted after training unless ``keep_pairs``.

Output (``run_dir``):

- ``checkpoint.pt``: ``{"epoch", "name", "state_dict", "mme": {...}}`` (no optimizer state); the
  ``mme`` record names the model and the training data, so ``mme evaluate`` needs no ``--model``.
- ``trainer/``: open_clip_train's own ``out.log`` and ``params.txt``.
- ``train_loss.csv``: ``step,epoch,loss,lr,logit_scale`` parsed from ``out.log`` (DVC plots),
  and its picture ``train_loss.png``.
- ``train.json``: configuration, data sizes, device, precision, wall time, final loss.

Everything is also logged to MLflow (via :mod:`mme.track.tracking`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mme import arguments, distributed, fsio, guard, models, paths, shards
from mme.config import ConfigError, VictimConfig, default_shards, section_from_args
from mme.track import plots, tracking
from mme.victim.open_clip_adapter import (
    TRAINER_NAME,
    one_caption_per_draw,
    parse_trainer_log,
    resolve_workers,
    run_trainer,
    seeded_sample_shuffle,
    trainer_argv,
    write_loss_csv,
)

PAIRS_SHARD_SIZE = 1000
OWNER = "mme train"


def iter_pairs(shard_dir: Path, split: str) -> Iterator[shards.Sample]:
    """One sample per (image, caption), caption-major; empty captions are skipped."""
    j = 0
    while True:
        found = False
        for s in shards.iter_samples(shard_dir, split):
            if j < len(s.captions):
                found = True
                if s.captions[j].strip():
                    meta = {"image_id": s.id, "caption_index": j}
                    yield shards.Sample(
                        f"{s.id}_c{j}", s.image_bytes, s.image_ext, [s.captions[j]], meta
                    )
        if not found:
            return
        j += 1


def write_pairs(
    shard_dir: Path, split: str, out_dir: Path, shard_size: int = PAIRS_SHARD_SIZE
) -> tuple[str, int, int]:
    """Write the pairs view of ``split`` to ``out_dir``; return (pattern, n_pairs, n_shards)."""
    records = shards.write_shards(out_dir, "pairs", iter_pairs(shard_dir, split), shard_size)
    n_pairs = sum(r["count"] for r in records)
    if n_pairs == 0:
        raise ValueError(f"no captions in the {split} split of {shard_dir}")
    return shards.brace_pattern(out_dir, "pairs"), n_pairs, len(records)


def count_captions(shard_dir: Path, split: str) -> int:
    """Non-empty captions of ``split``: the pairs an epoch holds."""
    return sum(
        sum(1 for c in s.captions if c.strip()) for s in shards.iter_samples(shard_dir, split)
    )


def view_shard_size(n: int, workers: int) -> int:
    """Samples per view shard: at most 1000, and enough shards for every worker."""
    return max(1, min(PAIRS_SHARD_SIZE, -(-n // max(1, workers))))


# On a small shared CPU, two jobs that each spin up one thread per core slow each other down
# ~10x (OpenMP threads wait on each other); one thread each keeps both near full speed.
cpu_threads = models.torch_threads


def data_provenance(shard_dir: Path) -> dict[str, Any]:
    """What the training data is: manifest hash and, for protected data, method/epsilon/trigger,
    and for a copy made by ``mme attack`` the attack (its spec).

    ``method`` is ``clean`` unless the manifest names one (:meth:`Manifest.data_record`). Shards
    without a manifest give ``None`` for the hash.
    """
    version = shards.manifest_sha256(shard_dir)
    if version is None:
        return {
            "data_manifest_sha256": None,
            "method": "clean",
            "epsilon": None,
            "trigger_len": None,
            "attack": None,
        }
    from mme.manifest import read_manifest

    return {"data_manifest_sha256": version, **read_manifest(shard_dir).data_record()}


def finalize_checkpoint(run_dir: Path, epochs: int, record: dict[str, Any]) -> Path:
    """Slim the trainer's last checkpoint into ``run_dir/checkpoint.pt`` (atomic); drop the rest."""
    ckpt_dir = run_dir / TRAINER_NAME / "checkpoints"
    last = ckpt_dir / f"epoch_{epochs}.pt"
    if not last.exists():
        raise FileNotFoundError(f"open_clip_train left no final checkpoint at {last}")
    full = torch.load(last, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in full["state_dict"].items()}
    slim = {"epoch": full["epoch"], "name": full.get("name"), "state_dict": sd, "mme": record}
    out = run_dir / "checkpoint.pt"
    with fsio.atomic_open(out) as f:
        torch.save(slim, f)
    shutil.rmtree(ckpt_dir)  # optimizer state: 3x the model, not needed downstream
    return out


def _clean_run_dir(run_dir: Path) -> None:
    """Remove our earlier outputs: open_clip_train refuses to reuse an existing log folder."""
    for name in (TRAINER_NAME, "pairs"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("checkpoint.pt", "train_loss.csv", "train_loss.png", "train.json"):
        (run_dir / name).unlink(missing_ok=True)


def train_params(cfg: VictimConfig, prov: dict[str, Any]) -> dict[str, Any]:
    """MLflow params of a training run (shared names, see :mod:`mme.track.tracking`)."""
    return {
        "victim_model": cfg.model,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "wd": cfg.wd,
        "warmup": cfg.warmup,
        "profile": cfg.profile,
        "seed": cfg.seed,
        "pretrained": cfg.pretrained,
        **prov,
    }


def run_folder(run_dir: Path) -> guard.Folder:
    """``mme train``'s run folder for :mod:`mme.guard`: ours only (a marker, or nothing but
    the files an earlier ``mme train`` wrote), so re-running replaces only what it made."""
    return guard.Folder(Path(run_dir), "run", "--run-dir")


def train_victim(cfg: VictimConfig, shards: Path, run_dir: Path) -> Path:
    """Train ``cfg.model`` on the ``train`` split of ``shards``; return ``run_dir/checkpoint.pt``.

    Seeded end to end (initialisation, shard and sample order, augmentation): on one device
    and thread count the same inputs give the same loss curve. Re-running into the same
    ``run_dir`` replaces its outputs; a ``run_dir`` another command (or a user) made is refused
    (:mod:`mme.guard`).

    Under ``torchrun`` open_clip_train runs DDP on every rank; rank 0 alone prepares the data
    view, finalizes the checkpoint and logs (MLflow); the other ranks wait at barriers.
    """
    shards, run_dir = Path(shards), Path(run_dir)
    models.check_model_name(cfg.model)
    device = models.resolve_device(cfg.device)  # fail before any work if cuda is missing
    inputs = {"training shards": shards, "victim.pretrained": cfg.pretrained}
    guard.check(OWNER, [run_folder(run_dir)], inputs)  # every rank, before any work
    world = distributed.init(device)
    distributed.note_nproc(world, cfg.nproc, "victim.nproc")
    settings = cfg.model_dump(mode="json", exclude={"nproc"})
    claim = guard.claim(OWNER, [run_folder(run_dir)], inputs, settings=settings)
    with claim if world.main else nullcontext():  # rank 0 holds the lock and writes
        if world.main:
            _clean_run_dir(run_dir)
        _train(cfg, shards, run_dir, world, device)
    return run_dir / "checkpoint.pt"


def _train(
    cfg: VictimConfig, shards: Path, run_dir: Path, world: distributed.World, device: torch.device
) -> None:
    prov = data_provenance(shards)
    try:
        view = training_data(cfg, shards, run_dir, device, world.size) if world.main else None
        data, n_pairs, n_shards = distributed.broadcast(world, view)  # type: ignore[misc]
        if n_shards < world.size:  # webdataset gives each rank whole shards
            raise ConfigError(
                f"{shards}: {n_shards} train shard(s) for {world.size} processes; write the set"
                " with a smaller shard_size or train with view: pairs"
            )
        argv = trainer_argv(cfg, run_dir, data, n_pairs, n_shards)
        n_images = shards_count(shards)
        check_batch_fits(cfg, n_images if cfg.view == "images" else n_pairs, argv, world.size)
        if world.main:
            print(
                f"mme train: {cfg.model} on {n_images} images / {n_pairs} pairs, {cfg.epochs} "
                f"epochs, device {device}, {world.size} process(es)",
                file=sys.stderr,
            )
        counts = {"n_images": n_images, "n_pairs": n_pairs}
        _tracked_training(cfg, shards, run_dir, argv, world, device, prov | counts)
    finally:
        if world.main and not cfg.keep_pairs:
            shutil.rmtree(run_dir / "pairs", ignore_errors=True)


def _tracked_training(
    cfg: VictimConfig,
    shards: Path,
    run_dir: Path,
    argv: list[str],
    world: distributed.World,
    device: torch.device,
    facts: dict[str, Any],
) -> None:
    """The trainer inside an MLflow ``train`` run (rank 0), then the finished checkpoint and the
    run's records; ``facts``: the data provenance plus ``n_images`` and ``n_pairs``."""
    counts = {k: facts[k] for k in ("n_images", "n_pairs")}
    prov = {k: v for k, v in facts.items() if k not in counts}
    run = (
        tracking.start_run(
            tracking.experiment_name(),
            f"train-{run_dir.name}",
            train_params(cfg, prov),
            tags={"stage": "train", "run_dir": str(run_dir)},
        )
        if world.main
        else nullcontext()
    )
    with run:
        t0 = time.time()
        view = one_caption_per_draw(cfg.seed) if cfg.view == "images" else nullcontext()
        with cpu_threads(cfg.threads), seeded_sample_shuffle(cfg.seed), view:
            with distributed.joined_group():
                run_trainer(argv)
        wall = time.time() - t0
        distributed.barrier(world)  # every rank is done with the data and the checkpoints
        if world.main:
            record = {
                "model": cfg.model,
                "victim": cfg.model_dump(mode="json", exclude={"nproc"}),
                "train_shards": str(shards),
                **counts,
                **prov,
            }
            finalize_checkpoint(run_dir, cfg.epochs, record)
            _record_outputs(run_dir, cfg, record, wall, str(device), argv)


def training_data(
    cfg: VictimConfig, shard_dir: Path, run_dir: Path, device: torch.device, ranks: int = 1
) -> tuple[str, int, int]:
    """(shard pattern, pairs per epoch, shard count) of the ``view`` the trainer reads."""
    if cfg.view == "images":
        n_pairs = count_captions(shard_dir, "train")
        if n_pairs == 0:
            raise ValueError(f"no captions in the train split of {shard_dir}")
        pattern = shards.brace_pattern(shard_dir, "train")
        return pattern, n_pairs, len(shards.shard_paths(shard_dir, "train"))
    n_pairs_guess = count_captions(shard_dir, "train")
    size = view_shard_size(n_pairs_guess, max(1, resolve_workers(cfg.workers, device)) * ranks)
    return write_pairs(shard_dir, "train", run_dir / "pairs", size)


def check_batch_fits(cfg: VictimConfig, per_pass: int, argv: list[str], ranks: int) -> None:
    """Fail before training when no data reader sees a full batch in one pass over its shards:
    open_clip_train drops partial batches and repeats the stream until an epoch's batches are
    drawn, so it would decode images forever without a single step (seen: 64 images, batch 128)."""
    readers = int(argv[argv.index("--workers") + 1]) * ranks
    if per_pass // max(1, readers) < cfg.batch_size:
        raise ConfigError(
            f"victim.batch_size = {cfg.batch_size}: more than the {per_pass} training samples "
            f"per pass ({readers} data reader(s)); the trainer would never fill a batch: set "
            f"victim.batch_size to at most {max(1, per_pass // max(1, readers))}"
        )


def shards_count(shard_dir: Path) -> int:
    return shards.count_samples(shard_dir, "train")


def _record_outputs(
    run_dir: Path, cfg: VictimConfig, record: dict, wall: float, device: str, argv: list[str]
) -> None:
    """Write train_loss.csv + train.json and log the loss curve and files to MLflow."""
    rows = parse_trainer_log(run_dir / TRAINER_NAME / "out.log", cfg.batch_size)
    write_loss_csv(rows, run_dir / "train_loss.csv")
    title = f"{cfg.model} on {record['train_shards']}"
    picture = plots.loss_curve(rows, run_dir / "train_loss.png", title)
    summary = {
        **record,
        "device": device,
        "precision": argv[argv.index("--precision") + 1],
        "train_wall_s": round(wall, 2),
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "trainer_argv": argv,
    }
    shards.write_json_atomic(run_dir / "train.json", summary)
    steps = [int(r["step"]) for r in rows]
    for key, name in (("loss", "train_loss"), ("lr", "lr"), ("logit_scale", "logit_scale")):
        tracking.log_metric_series(name, steps, [r[key] for r in rows])
    tracking.log_metrics({"train_wall_s": wall, "final_train_loss": summary["final_train_loss"]})
    for name in ("train.json", "train_loss.csv", f"{TRAINER_NAME}/out.log"):
        tracking.log_artifact(run_dir / name)
    if picture is not None:
        tracking.log_artifact(picture)
    print(
        f"mme train: done in {wall:.0f} s, final loss {summary['final_train_loss']}, "
        f"checkpoint {run_dir / 'checkpoint.pt'}",
        file=sys.stderr,
    )


add_arguments = arguments.train  # flags live where --help needs no torch


def run(args: argparse.Namespace) -> int:
    from mme.config import ConfigError

    cfg = section_from_args("victim", args)
    shard_dir = args.shards or default_shards(args.params)
    if not shards.shard_paths(shard_dir, "train"):
        raise ConfigError(f"no train-*.tar shards in {shard_dir}: run `mme prepare` first")
    try:
        models.check_model_name(cfg.model)
        models.resolve_device(cfg.device)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    run_dir = args.run_dir or paths.victim_run(shard_dir)
    print(train_victim(cfg, shard_dir, run_dir))
    return 0
