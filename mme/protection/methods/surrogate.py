"""Step 1 of a round: train the surrogate CLIP on the pairs as they are now protected.

M steps (``surrogate_steps``, or ``surrogate_epochs`` of an epoch) of open_clip's contrastive
``ClipLoss`` on ``(x_i + δ_i, t_i ⊕ caption)`` (``noisy=False``: the clean pairs, for
``errmax``), AdamW (``optim.py``), the temperature clamped at 100 as CLIP does. Each step draws a
batch of all images (not only the protected ones), one EOT draw and one random caption each.

Under torchrun each rank encodes its share of every batch (its rows of the batch's EOT draw,
made by every rank); the features are gathered (with gradients) so the loss is the whole
batch's, BatchNorm layers normalise with the whole batch's statistics (``syncbn.py``), and DDP
averages the gradients: the update is the one-process update up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mme import distributed
from mme.protection.methods.loop import Loop

MAX_LOGIT_SCALE = 4.6052  # ln(100): CLIP clamps the temperature at 100


def surrogate_steps(loop: Loop) -> int:
    """M: ``surrogate_steps``, or ``surrogate_epochs`` of an epoch of surrogate batches."""
    cfg = loop.cfg
    if cfg.surrogate_epochs is None:
        return cfg.surrogate_steps
    return max(1, math.ceil(cfg.surrogate_epochs * loop.store.n / cfg.batch_size))


def train_surrogate(loop: Loop, steps: int, noisy: bool) -> float:
    """``steps`` steps of contrastive training on the (protected) pairs; mean loss."""
    model = loop.model
    model.train().requires_grad_(True)
    towers = surrogate_towers(loop)
    batches: list[torch.Tensor] = []
    total = torch.zeros((), device=loop.device)
    for _ in tqdm(range(steps), desc="  surrogate", leave=False, unit="step"):
        if not batches:
            batches = loop.batches(protected_only=False)
        loss = surrogate_loss(loop, towers, batches.pop(), noisy)
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        total += loss.detach()
    model.eval().requires_grad_(False)
    return float(total) / max(steps, 1)


def surrogate_loss(
    loop: Loop, towers: torch.nn.Module, idx: torch.Tensor, noisy: bool
) -> torch.Tensor:
    """The contrastive loss of batch ``idx`` (on ``loop.device``, with its graph): this rank
    encodes its rows, the features of every rank's rows are gathered. Draws (EOT, captions)
    are the whole batch's on every rank: ``gen`` stays in step."""
    store, world = loop.store, loop.world
    local = distributed.shard(world, torch.arange(len(idx)))
    draw = loop.eot_draw(len(idx))
    x = loop.augment(store.images(idx[local], loop.device, noisy=noisy), draw, local)
    caps, cols = store.pick_captions(idx, loop.gen)
    tokens = store.texts(idx, caps, loop.with_trigger, cols)
    with loop.runtime.autocast():
        img, txt = towers(x, tokens[local].to(loop.device))
        sizes = distributed.counts(world, len(idx))
        img = distributed.gather_rows(world, img, sizes)
        txt = distributed.gather_rows(world, txt, sizes)
        return loop.loss(img.float(), txt.float(), loop.model.logit_scale.exp())


def surrogate_towers(loop: Loop) -> torch.nn.Module:
    """``(x, tokens) -> (image, text)`` unit features; DDP-wrapped under torchrun."""
    towers = Towers(loop)
    if not loop.world.active:
        return towers
    if loop.ddp is None:  # built once, while the parameters require gradients
        loop.ddp = distributed.wrap_ddp(loop.world, towers, loop.device)
    return loop.ddp


class Towers(torch.nn.Module):
    """The surrogate's two towers as one module, so DDP sees (and syncs) one forward pass."""

    def __init__(self, loop: Loop) -> None:
        super().__init__()
        self.model = loop.model
        self._runtime = [loop.runtime]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rt = self._runtime[0]
        img = F.normalize(rt.encode_image_raw(rt.normalize(x)), dim=-1)
        return img, F.normalize(rt.text_features(tokens), dim=-1)
