"""The adapter to ``open_clip_train``, the community CLIP trainer: all that knows its command
line, its log format and its internals (we write no training loop; :mod:`mme.victim.train`
decides what to train on and collects the results).

- :func:`trainer_argv`: a :class:`~mme.config.VictimConfig` as the trainer's command line.
- :func:`run_trainer`: ``open_clip_train.main.main(argv)`` in-process (so the model configs we
  register with open_clip are visible to it), undoing its global logging changes afterwards.
- :func:`parse_trainer_log` / :func:`write_loss_csv`: its ``out.log`` as per-step loss rows.
- Patches for the length of one run: :func:`seeded_sample_shuffle` (its sample shuffle buffer
  seeded) and :func:`one_caption_per_draw` (its tokenizer takes one caption of a sample's
  ``txt``, :class:`OneCaption`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mme import fsio, models
from mme.config import VictimConfig

TRAINER_NAME = "trainer"  # open_clip_train's --name: its logs go to run_dir/trainer
# A log line of open_clip_train.train.train_one_epoch, e.g. "Train Epoch: 0 [ 256/10112 (3%)]
# Data (t): ... LR: 0.000100 Logit Scale: 14.3 Contrastive_loss: ... Loss: 4.1 (4.2)"
LOG_RE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/(?P<total>\d+).*?"
    r"LR: (?P<lr>[-+0-9.eE]+) Logit Scale: (?P<scale>[-+0-9.eE]+).* Loss: (?P<loss>[-+0-9.eE]+) "
)


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """``None``: 1 on CPU (cores are the compute there); on CUDA all cores but two, at most 16
    (decoding + augmenting 224-px images is what feeds the GPU)."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 1
    return max(1, min(16, (os.cpu_count() or 1) - 2))


class OneCaption:
    """A tokenizer that, given a sample's ``txt`` (captions one per line), tokenizes one of them
    drawn with its own seeded generator (each data-loader worker gets a copy of it)."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tokenizer, self.rng = tokenizer, random.Random(seed)

    def pick(self, text: str) -> str:
        lines = [c for c in text.split("\n") if c.strip()]
        return self.rng.choice(lines) if lines else text

    def __call__(self, texts: str | list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer([self.pick(t) for t in texts], *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "tokenizer":  # unpickling: no state yet
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


@contextlib.contextmanager
def one_caption_per_draw(seed: int) -> Iterator[None]:
    """Hand open_clip_train a :class:`OneCaption` tokenizer (it looks ``get_tokenizer`` up in
    its ``main`` module when it builds the data pipeline)."""
    import open_clip_train.main as trainer

    original = trainer.get_tokenizer

    def get_tokenizer(*args: Any, **kwargs: Any) -> OneCaption:
        return OneCaption(original(*args, **kwargs), seed)

    trainer.get_tokenizer = get_tokenizer
    try:
        yield
    finally:
        trainer.get_tokenizer = original


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA, fp32 on CPU (CPU autocast is slower, not faster)."""
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return precision


def trainer_argv(
    cfg: VictimConfig, run_dir: Path, data: str, n_pairs: int, n_shards: int
) -> list[str]:
    """The open_clip_train command line for ``cfg`` (train on ``data``, logs in ``run_dir``)."""
    device = models.resolve_device(cfg.device)
    steps_per_epoch = max(1, n_pairs // cfg.batch_size)
    flags: dict[str, Any] = {
        "--train-data": data,
        "--dataset-type": "webdataset",
        "--train-num-samples": n_pairs,
        "--model": cfg.model,
        "--epochs": cfg.epochs,
        "--batch-size": cfg.batch_size,
        "--lr": cfg.lr,
        "--wd": cfg.wd,
        "--warmup": cfg.warmup,
        "--lr-scheduler": "cosine",
        "--precision": resolve_precision(cfg.precision, device),
        "--device": device,
        "--seed": cfg.seed,
        # the trainer asserts shards >= workers
        "--workers": min(resolve_workers(cfg.workers, device), n_shards),
        "--logs": run_dir,
        "--name": TRAINER_NAME,
        "--report-to": "",  # no wandb/tensorboard: we log to MLflow from out.log
        "--save-frequency": 1,  # with --delete-previous-checkpoint: only the latest epoch
        "--log-every-n-steps": max(1, min(100, steps_per_epoch // 20)),
    }
    if cfg.pretrained is not None:
        flags["--pretrained"] = cfg.pretrained
    return [str(x) for kv in flags.items() for x in kv] + ["--delete-previous-checkpoint"]


@contextlib.contextmanager
def seeded_sample_shuffle(seed: int) -> Iterator[None]:
    """Give open_clip_train's sample-level ``wds.shuffle`` a generator seeded with ``seed``.

    Why: its shard shuffle is seeded by ``--seed`` but its sample shuffle buffer draws its seed
    from the pid and the clock, so two runs saw different batches from step 0 (clean victims
    varied 40-48x chance across identical ``make run``s). open_clip_train looks
    ``webdataset.shuffle`` up when it builds the pipeline; the data-loader worker gets its own
    copy of this generator, so the order is the same on every run with the same seed.
    """
    import random

    import webdataset

    original = webdataset.shuffle

    def shuffle(*args: Any, rng: random.Random | None = None, **kwargs: Any) -> Any:
        return original(*args, rng=rng or random.Random(seed), **kwargs)

    webdataset.shuffle = shuffle
    try:
        yield
    finally:
        webdataset.shuffle = original


class _NoModelPrintout(logging.Filter):
    """Drops open_clip_train's "Model:" line and the module printout after it (hundreds of
    lines of ``str(model)``); the model's config is in the run folder's params.txt."""

    def __init__(self) -> None:
        super().__init__()
        self.skip_next = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.skip_next:
            self.skip_next = False
            return False
        if record.name == "root" and record.msg == "Model:":
            self.skip_next = True
            return False
        return True


class _NotTrainerRecords(logging.Filter):
    """Passes everything but the trainer's own records (it logs through the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root"


def run_trainer(argv: list[str]) -> None:
    """Run ``open_clip_train.main.main(argv)`` in-process and undo its global logging changes.

    open_clip_train adds root log handlers (stderr + out.log) and raises every logger to INFO on
    each call; left alone, a second run in the same process would write into the first run's log.
    """
    from open_clip_train.main import main as trainer_main

    models.register_configs()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {
        n: lg.level for n, lg in root.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    # Once, and without the model printout: the trainer prints through its own stderr handler,
    # so handlers that were already there (e.g. Prefect's console) skip its root-logger records.
    quiet, own = _NoModelPrintout(), _NotTrainerRecords()
    root.addFilter(quiet)
    for h in handlers:
        h.addFilter(own)
    try:
        status = trainer_main(argv)
    finally:
        root.removeFilter(quiet)
        for h in handlers:
            h.removeFilter(own)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        for name, lg in root.manager.loggerDict.items():
            if name in levels:
                lg.setLevel(levels[name])
            elif isinstance(lg, logging.Logger) and lg.level == logging.INFO:
                lg.setLevel(logging.NOTSET)  # created during the run, raised to INFO by it
    if status not in (None, 0):
        raise RuntimeError(f"open_clip_train failed (status {status}); see its log above")


def parse_trainer_log(log_path: Path, batch_size: int) -> list[dict[str, float]]:
    """Per-step rows ``{step, epoch, loss, lr, logit_scale}`` from open_clip_train's ``out.log``.

    ``step`` is the global optimizer step (0-based) the trainer logged at; ``loss`` is that step's
    loss (not the running average the trainer prints in parentheses).
    """
    rows = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        m = LOG_RE.search(line)
        if m is None:
            continue
        epoch, seen, total = int(m["epoch"]), int(m["seen"]), int(m["total"])
        step = epoch * (total // batch_size) + seen // batch_size - 1
        rows.append(
            {
                "step": step,
                "epoch": epoch,
                "loss": float(m["loss"]),
                "lr": float(m["lr"]),
                "logit_scale": float(m["scale"]),
            }
        )
    return rows


def write_loss_csv(rows: list[dict[str, float]], path: Path) -> None:
    fields = ["step", "epoch", "loss", "lr", "logit_scale"]
    with fsio.atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
