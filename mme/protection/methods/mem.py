"""Multi-step Error Minimization (MEM) and the baselines that share its loop.

Spec (Liu et al., "Multimodal Unlearnable Examples: Protecting Data against Multimodal
Contrastive Learning", ACM MM 2024, arXiv 2407.16307, Alg. 1). Per image i: noise δ_i with
‖δ_i‖∞ ≤ ε and a trigger t_i of k tokens prepended to all its captions. T outer rounds of

1. surrogate: M steps of contrastive (open_clip ``ClipLoss``) training on the protected pairs
   ``(x_i + δ_i, t_i ⊕ caption)``, AdamW;
2. triggers (rounds < H): HotFlip over all protected pairs (``hotflip.py``);
3. noise: S steps of error-minimising PGD over all protected pairs (``pgd.py``) with, at each
   step, the caption bodies shuffled within the batch while each trigger stays with its own
   image — the loss can then only be lowered by binding the noise to the trigger.

Paper defaults: ε = 8/255, α = 1/255, S = 8, T = 20, M = 200, batch 128, lr 1e-4, H = 5, C = 16,
k ∈ {3, 5}. Shapes: images (B, 3, S, S) in [0, 1]; tokens (B, L); triggers (B, k).

Baselines (same loop, ``method``): ``em`` image-only error minimisation (no trigger, no shuffle);
``errmax`` surrogate trained on clean pairs, then error-maximising PGD (TAP-like); ``random``
uniform integer noise in [−ε, ε] (no model).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mme import distributed
from mme.config import PoisonConfig
from mme.models import normalizer
from mme.protection.methods import hotflip, text
from mme.protection.methods.augment import eot
from mme.protection.methods.pgd import pgd
from mme.protection.methods.store import PairStore
from mme.protection.methods.triggers import insert_trigger

RoundHook = Callable[[int, dict[str, float]], None]
NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """CLIP's rule (open_clip_train; the MEM code's CyCLIP-derived trainer): gains, biases, norm
    layers and the temperature are not decayed; weight matrices and embeddings are."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_KEYS)


def decay_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``wd`` for weights, 0 for what :func:`no_decay` excludes."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": wd},
    ]


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


class MEM:
    """The outer loop; ``run`` resumes from ``start_round`` with the given states."""

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
        self.opt = torch.optim.AdamW(
            decay_groups(model, cfg.surrogate_wd), lr=cfg.surrogate_lr, weight_decay=0.0
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)  # all data sampling draws from it
        # Under torchrun every rank keeps ``gen`` in step (same batches, captions, shuffles) and
        # draws its EOT transformations from its own generator; one process: ``gen`` for all.
        self.aug_gen = self.gen
        if self.world.active:
            self.aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1 + self.world.rank)
        self.ddp: torch.nn.Module | None = None  # the DDP-wrapped towers, made on first use
        mean, std = normalizer(model)
        self.mean = mean.to(self.device)[:, None, None]
        self.std = std.to(self.device)[:, None, None]
        self.cuda = self.device.type == "cuda"
        self.encode_image_raw = model.encode_image
        if self.cuda:
            model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        if cfg.compile:  # the image tower carries almost all PGD work
            self.encode_image_raw = torch.compile(model.encode_image)

    # -- model helpers -------------------------------------------------------------------
    def autocast(self):
        if self.cuda:  # bf16 on the GPU; fp32 on the CPU (bf16 there is slow and inexact)
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, D) unit features."""
        x = (x - self.mean) / self.std
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return F.normalize(self.encode_image_raw(x).float(), dim=-1)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L) -> (n, D) raw text features, captions trimmed to the longest (``text.py``)."""
        return text.encode_text(self.model, tokens)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L) -> (n, D) unit features, in chunks (HotFlip sends B × C texts at once)."""
        chunk = max(self.cfg.batch_size * 4, 256)
        with self.autocast():
            out = [self.text_features(t.to(self.device)).float() for t in tokens.split(chunk)]
        return F.normalize(torch.cat(out), dim=-1)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """A random draw of the ``cfg.eot`` transformations when ``cfg.augment``, else identity."""
        if not self.cfg.augment:
            return x
        c = self.cfg
        return eot(x, self.aug_gen, c.eot, c.eot_interpolation, c.eot_resize, c.eot_jpeg_quality)

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().detach()

    def clip_loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.loss(img, txt, self.scale())

    def cache_store(self) -> None:
        """Move the store's pixels and noise to the GPU when they take < 40 % of free memory.

        Done on first use (after ``init_state`` / ``--resume`` filled the noise), not in
        ``__init__``."""
        if self.cuda and not self.store.cached:
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.store.device_bytes() < 0.4 * free:
                self.store.cache_on(self.device)

    def batches(self, protected_only: bool) -> list[torch.Tensor]:
        """A fresh random order of image indices, cut into batches."""
        self.cache_store()
        pool = torch.nonzero(self.store.protect).flatten() if protected_only else None
        pool = torch.arange(self.store.n) if pool is None else pool
        order = pool[torch.randperm(len(pool), generator=self.gen)]
        min_last = max(2, self.world.size) if not protected_only else 2
        return split_batches(order, self.cfg.batch_size, min_last)

    def surrogate_steps(self) -> int:
        """M: ``surrogate_steps``, or ``surrogate_epochs`` of an epoch of surrogate batches."""
        if self.cfg.surrogate_epochs is None:
            return self.cfg.surrogate_steps
        return max(1, math.ceil(self.cfg.surrogate_epochs * self.store.n / self.cfg.batch_size))

    def mine(self, i: int) -> bool:
        """Whether batch ``i`` of a HotFlip/PGD pass is this rank's (all of them for one)."""
        return i % self.world.size == self.world.rank

    # -- the three steps of a round ------------------------------------------------------
    def train_surrogate(self, steps: int, noisy: bool) -> float:
        """M steps of contrastive training on (protected) pairs; mean loss.

        Under torchrun each rank encodes its share of every batch; the features are gathered
        (with gradients) so the loss is the whole batch's, and DDP averages the gradients: the
        update is the one-process update up to float rounding."""
        self.model.train().requires_grad_(True)
        towers = self.towers()
        batches: list[torch.Tensor] = []
        total = torch.zeros((), device=self.device)
        for _ in tqdm(range(steps), desc="  surrogate", leave=False, unit="step"):
            if not batches:
                batches = self.batches(protected_only=False)
            idx = batches.pop()
            local = distributed.shard(self.world, torch.arange(len(idx)))
            x = self.augment(self.store.images(idx[local], self.device, noisy=noisy))
            # captions for the whole batch on every rank: ``gen`` stays in step across ranks
            caps, cols = self.store.pick_captions(idx, self.gen)
            tokens = self.store.texts(idx, caps, self.with_trigger, cols)
            with self.autocast():
                img, txt = towers(x, tokens[local].to(self.device))
                if self.world.active:
                    sizes = distributed.counts(self.world, len(idx))
                    img = distributed.gather_rows(self.world, img, sizes)
                    txt = distributed.gather_rows(self.world, txt, sizes)
                loss = self.loss(img.float(), txt.float(), self.model.logit_scale.exp())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            with torch.no_grad():  # CLIP clamps the temperature at 100
                self.model.logit_scale.clamp_(0, 4.6052)
            total += loss.detach()
        self.model.eval().requires_grad_(False)
        return float(total) / max(steps, 1)

    def towers(self) -> torch.nn.Module:
        """``(x, tokens) -> (image, text)`` unit features; DDP-wrapped under torchrun."""
        towers = _Towers(self)
        if not self.world.active:
            return towers
        if self.ddp is None:  # built once, while the parameters require gradients
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.cuda else None
            self.ddp = DistributedDataParallel(towers, device_ids=ids, broadcast_buffers=False)
        return self.ddp

    def update_triggers(self) -> float:
        """One HotFlip pass over all protected pairs; mean own loss term after the update.

        Under torchrun each rank takes every ``world``-th batch (the surrogate is frozen, so
        batches are independent), then the ranks exchange the triggers they changed."""
        allowed = self.allowed.to(self.device)
        emb = self.model.token_embedding.weight.detach()
        k, total, count = self.cfg.trigger_len, 0.0, 0
        owned = torch.zeros(self.store.n, dtype=torch.bool)
        for i, idx in enumerate(tqdm(self.batches(True), desc="  triggers", leave=False)):
            # drawn by every rank: keeps gen in step
            caps, cols = self.store.pick_captions(idx, self.gen)
            if not self.mine(i):
                continue
            owned[idx] = True
            with torch.no_grad():
                img = self.encode_image(self.store.images(idx, self.device))
            trig = self.store.triggers[idx].to(self.device)
            tokens = self.store.texts(idx, caps, True, cols).to(self.device)
            grad = hotflip.trigger_gradients(
                self.model, tokens, img, k, self.clip_loss, self.text_features, cols
            )
            cands = hotflip.top_candidates(grad, emb, allowed, self.cfg.candidates)

            def build(t: torch.Tensor, caps=caps, cols=cols) -> torch.Tensor:
                # each row's candidates are evaluated at that row's own trigger columns
                reps = t.shape[0] // len(caps)
                rows = caps.repeat_interleave(reps, 0).to(t.device)
                at = None if cols is None else cols.repeat_interleave(reps, 0)
                return insert_trigger(rows, t, self.store.eot_id, at)

            new, own = hotflip.greedy_flip(self.encode_text, build, trig, cands, img, self.scale())
            self.store.triggers[idx] = new.cpu()
            total, count = total + float(own.sum()), count + len(idx)
        if self.world.active:
            self.share_triggers(owned)
            total, count = self.sum_over_ranks(total, count)
        return total / max(count, 1)

    def share_triggers(self, owned: torch.Tensor) -> None:
        """Every rank gets each trigger from the rank that updated it (each row has one owner)."""
        mine = torch.where(owned[:, None], self.store.triggers, 0)
        updated = distributed.all_sum_(self.world, owned.long())
        new = distributed.all_sum_(self.world, mine)
        self.store.triggers = torch.where(updated[:, None] > 0, new, self.store.triggers)

    def sum_over_ranks(self, total: float, count: int) -> tuple[float, int]:
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        t = distributed.all_sum_(self.world, t)
        return float(t[0]), int(t[1])

    def update_noise(self, minimize: bool, shuffle: bool) -> float:
        """S PGD steps for every protected image, written to the next noise buffer."""
        s = self.cfg.pgd_steps
        total, count = 0.0, 0
        if self.world.main:  # one copy of the shared file; the ranks then write disjoint rows
            self.store.begin_round()
            self.store.noise[1 - self.store.current].flush()
        distributed.barrier(self.world)
        for i, idx in enumerate(tqdm(self.batches(True), desc="  noise", leave=False)):
            b = len(idx)
            caps, cols = self.store.pick_captions(idx, self.gen)
            # MEM: a new shuffle of the caption bodies at every step; otherwise captions stay put
            perms = [torch.randperm(b, generator=self.gen) for _ in range(s)]
            perms = perms if shuffle else [torch.arange(b)]
            if not self.mine(i):  # another rank's batch (its draws above keep gen in step)
                continue
            texts = torch.cat([self.shuffled_texts(idx, caps, cols, p) for p in perms])
            with torch.no_grad():  # the text is fixed during PGD: features once, no grad
                txt = self.encode_text(texts).view(len(perms), b, -1)
            x = self.store.clean_batch(idx, self.device)
            delta = self.store.noise_batch(idx, self.device)

            def loss_fn(x_adv: torch.Tensor, step: int, txt=txt) -> torch.Tensor:
                return self.clip_loss(self.encode_image(self.augment(x_adv)), txt[step % len(txt)])

            delta, loss = pgd(x, delta, loss_fn, s, self.alpha, self.eps, minimize)
            self.store.write_noise(idx, delta)
            total, count = total + float(loss) * b, count + b
        if self.world.active:
            self.store.noise[1 - self.store.current].flush()
            total, count = self.sum_over_ranks(total, count)  # also: every rank has written
        return total / max(count, 1)

    def shuffled_texts(
        self, idx: torch.Tensor, caps: torch.Tensor, cols: torch.Tensor | None, perm: torch.Tensor
    ) -> torch.Tensor:
        """Image ``idx[b]``'s trigger in caption ``caps[perm[b]]``. With per-image positions
        (``cols``), the trigger goes at its own image's word position, clamped to the borrowed
        caption's length (the column where that caption's tokens end, before its EOT)."""
        body = caps[perm]
        if cols is None:
            return self.store.texts(idx, body, self.with_trigger)
        end = (body == self.store.eot_id).long().argmax(dim=1)  # EOT column of each body
        at = torch.minimum(cols, end.clamp(min=1))
        return self.store.texts(idx, body, self.with_trigger, at)

    # -- outer loop ----------------------------------------------------------------------
    def run_round(self, r: int) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        stats: dict[str, float] = {}
        if cfg.method == "errmax":  # surrogate on clean pairs; one maximising pass at the end
            stats["surrogate_loss"] = self.train_surrogate(self.surrogate_steps(), noisy=False)
            if r == cfg.rounds - 1:
                stats["pgd_loss"] = self.update_noise(minimize=False, shuffle=False)
        else:
            stats["surrogate_loss"] = self.train_surrogate(self.surrogate_steps(), noisy=True)
            if self.with_trigger and r < cfg.trigger_rounds:
                stats["trigger_loss"] = self.update_triggers()
            shuffle = self.with_trigger and cfg.shuffle_captions
            stats["pgd_loss"] = self.update_noise(minimize=True, shuffle=shuffle)
        if "pgd_loss" in stats:
            self.store.swap()
        stats["mean_abs_noise_px"] = self.mean_abs_noise()
        stats["round_seconds"] = time.perf_counter() - t0
        return stats

    def mean_abs_noise(self) -> float:
        """Mean |δ| in pixel units over protected images (streamed, constant memory)."""
        buf = self.store.noise[self.store.current]
        rows = torch.nonzero(self.store.protect).flatten().numpy()
        mine = rows[self.world.rank :: self.world.size]  # each rank reads its share
        total = 0.0
        for chunk in np.array_split(mine, max(1, len(mine) // 256)):
            total += float(np.abs(buf[chunk].astype(np.int16)).sum(dtype=np.float64))
        if self.world.active:
            total, _ = self.sum_over_ranks(total, 0)
        return total / max(len(rows) * int(np.prod(buf.shape[1:])), 1)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps; under torchrun a collective (every rank's EOT generator)."""
        state = {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.world.active:
            state["aug_gens"] = distributed.gather_objects(self.world, self.aug_gen.get_state())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        if self.world.active and "aug_gens" in state:
            self.aug_gen.set_state(state["aug_gens"][self.world.rank])


class _Towers(torch.nn.Module):
    """The surrogate's two towers as one module, so DDP sees (and syncs) one forward pass."""

    def __init__(self, mem: MEM) -> None:
        super().__init__()
        self.model = mem.model
        self._mem = [mem]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem = self._mem[0]
        img = F.normalize(mem.encode_image_raw((x - mem.mean) / mem.std), dim=-1)
        return img, F.normalize(mem.text_features(tokens), dim=-1)
