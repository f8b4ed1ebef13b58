"""What every step of a protection round shares: the surrogate, the store, the random stream,
the device, the process group. Each step (``surrogate.py``, ``trigger_step.py``,
``noise_step.py``) is a function of a :class:`Loop`; a method (``mem.py``) orders them.

Under torchrun a :class:`Loop` keeps every rank's replica identical, for any method built on it:
BatchNorm layers become :class:`~mme.protection.methods.syncbn.SyncedBatchNorm`, every rank
makes every random draw (``rng.py``; EOT through :meth:`Loop.eot_draw`), and :meth:`Loop.state`
checks that the ranks agree before a checkpoint keeps rank 0's state for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from mme import distributed
from mme.config import PoisonConfig
from mme.protection.methods.augment import EotDraw, draw_eot
from mme.protection.methods.optim import adamw
from mme.protection.methods.rng import generator, load_rng_state, rng_state
from mme.protection.methods.runtime import Runtime
from mme.protection.methods.store import PairStore
from mme.protection.methods.syncbn import sync_batchnorm


def split_batches(order: torch.Tensor, batch_size: int, min_last: int = 2) -> list[torch.Tensor]:
    """Cut ``order`` into batches; a last batch under ``min_last`` joins the previous one.

    Why: ClipLoss of a single pair is 0 (its only candidate is itself), so that image's
    noise, trigger and surrogate step would never move. Under torchrun a surrogate batch is
    split over the ranks, so it needs a row for each (``min_last`` = world size).
    """
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < min_last:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def timed(stats: dict[str, float], step: str, run: Callable[[], float]) -> None:
    """``stats[step_loss] = run()`` and ``stats[step_seconds]``, its wall time: the steps' passes
    cost differently (a surrogate step also trains the text tower), and the dry run's time probe
    (:mod:`mme.app.probe`) prices each step apart."""
    t0 = time.perf_counter()
    stats[f"{step}_loss"] = run()
    stats[f"{step}_seconds"] = time.perf_counter() - t0


class Loop:
    """The state of one protection run (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        store: PairStore,
        cfg: PoisonConfig,
        device: torch.device,
        allowed: torch.Tensor | None = None,
        world: distributed.World | None = None,
    ) -> None:
        self.model, self.store, self.cfg, self.device = model, store, cfg, torch.device(device)
        self.world = world or distributed.World()
        self.allowed = allowed  # (V,) bool trigger vocabulary, see triggers.candidate_mask
        self.history: list[dict[str, float]] = []  # per-round stats, saved in checkpoints
        self.eps, self.alpha = cfg.epsilon / 255.0, cfg.step_size / 255.0
        self.with_trigger = cfg.method == "mem"
        self.loss = open_clip.ClipLoss()
        sync_batchnorm(model, self.world)  # before the optimiser and DDP see the modules
        self.opt = adamw(model, cfg.surrogate_lr, cfg.surrogate_wd)
        self.gen = generator(cfg.seed)  # every random draw of the loop, the same on every rank
        self.ddp: torch.nn.Module | None = None  # the DDP-wrapped towers, made on first use
        self.runtime = Runtime(model, cfg, self.device)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, D) unit features (:class:`Runtime`)."""
        return self.runtime.encode_image(x)

    def eot_draw(self, b: int) -> EotDraw | None:
        """One draw of the ``cfg.eot`` transformations for a batch of ``b`` images from ``gen``
        (None when ``cfg.augment`` is off). Every rank draws for every batch, its own or not."""
        c = self.cfg
        if not c.augment:
            return None
        return draw_eot(b, self.gen, c.eot, c.eot_interpolation, c.eot_resize, c.eot_jpeg_quality)

    def augment(
        self, x: torch.Tensor, draw: EotDraw | None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` through ``draw`` (its ``rows`` when ``x`` is a rank's share of the batch)."""
        if draw is None:
            return x
        return (draw if rows is None else draw.rows(rows)).apply(x)

    def clip_loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.loss(img, txt, self.runtime.scale())

    def batches(self, protected_only: bool) -> list[torch.Tensor]:
        """A fresh random order of image indices, cut into batches."""
        self.runtime.cache_store(self.store)
        pool = torch.nonzero(self.store.protect).flatten() if protected_only else None
        pool = torch.arange(self.store.n) if pool is None else pool
        order = pool[torch.randperm(len(pool), generator=self.gen)]
        if len(order) == 1 and self.store.n > 1:  # a lone protected image: see negative()
            order = torch.cat([order, self.negative()])
        min_last = max(2, self.world.size) if not protected_only else 2
        return split_batches(order, self.cfg.batch_size, min_last)

    def negative(self) -> torch.Tensor:
        """One unprotected image, drawn from ``gen``, to pair with the only protected one: the
        contrastive loss of a batch of one pair is 0, so its noise and trigger would never
        move. The steps update protected rows only (:attr:`PairStore.protect`)."""
        others = torch.nonzero(~self.store.protect).flatten()
        return others[torch.randint(len(others), (1,), generator=self.gen)]

    def mine(self, i: int) -> bool:
        """Whether batch ``i`` of a HotFlip/PGD pass is this rank's (all of them for one)."""
        return i % self.world.size == self.world.rank

    def mean_abs_noise(self) -> float:
        """Mean |δ| in pixel units over protected images (streamed, constant memory)."""
        buf = self.store.noise[self.store.current]
        rows = torch.nonzero(self.store.protect).flatten().numpy()
        mine = rows[self.world.rank :: self.world.size]  # each rank reads its share
        total = 0.0
        for chunk in np.array_split(mine, max(1, len(mine) // 256)):
            total += float(np.abs(buf[chunk].astype(np.int16)).sum(dtype=np.float64))
        total, _ = distributed.sum_scalars(self.world, total, 0)
        return total / max(len(rows) * int(np.prod(buf.shape[1:])), 1)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (rank 0's). Under torchrun a collective: every rank must hold
        the same surrogate, optimiser and random streams, or resuming from rank 0's state would
        not restore the others; a drift stops the run (:func:`mme.distributed.check_same`)."""
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict()}
        state |= rng_state(self.gen)
        if self.world.active:
            what = "the surrogate, its optimiser or the random streams"
            distributed.check_same(self.world, what, distributed.digest(state))
        return state

    def write_private(self, folder: Path) -> None:
        """The method's own private files besides the noise (none for MEM and the baselines)."""

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        load_rng_state(state, self.gen)
