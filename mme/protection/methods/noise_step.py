"""Step 3 of a round: S steps of PGD (``pgd.py``) for every protected image, written to the
store's next noise buffer.

``minimize=True``: error-minimising noise (MEM, ``em``); ``False``: error-maximising (``errmax``).
With ``shuffle`` (MEM) the caption bodies are shuffled within the batch at every PGD step while
each trigger stays with its own image: the loss can then only be lowered by binding the noise to
the trigger. Each step sees one EOT draw of the noisy image. Only protected rows are written
(a batch holds an unprotected one only when a single image is protected, ``Loop.negative``).

Under torchrun each rank takes every ``world``-th batch and writes its rows of the shared file;
every rank draws the captions, shuffles and EOT transformations of every batch, so image i's
steps are the same whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from mme import distributed
from mme.protection.methods.augment import EotDraw
from mme.protection.methods.loop import Loop
from mme.protection.methods.pgd import pgd


@dataclass(frozen=True)
class NoiseDraws:
    """A batch's random draws for one PGD pass, made by every rank in this order: the caption
    of each image (and its trigger columns), the caption shuffle of each step, the EOT
    transformations of each step."""

    caps: torch.Tensor  # (B, L) tokens
    cols: torch.Tensor | None  # (B,) trigger columns, None: after the start token
    perms: list[torch.Tensor]  # S shuffles (B,), or one identity
    eot: list[EotDraw | None]  # S draws


def draw_noise_batch(loop: Loop, idx: torch.Tensor, shuffle: bool) -> NoiseDraws:
    """The draws of batch ``idx`` (every rank, whether the batch is its own or not)."""
    b, s = len(idx), loop.cfg.pgd_steps
    caps, cols = loop.store.pick_captions(idx, loop.gen)
    # MEM: a new shuffle of the caption bodies at every step; otherwise captions stay put
    perms = [torch.randperm(b, generator=loop.gen) for _ in range(s)]
    perms = perms if shuffle else [torch.arange(b)]
    return NoiseDraws(caps, cols, perms, [loop.eot_draw(b) for _ in range(s)])


def update_noise(loop: Loop, minimize: bool, shuffle: bool) -> float:
    """S PGD steps for every protected image; mean loss of the last step."""
    store = loop.store
    total, count = 0.0, 0
    if loop.world.main:  # one copy of the shared file; the ranks then write disjoint rows
        store.begin_round()
        store.noise[1 - store.current].flush()
    distributed.barrier(loop.world)
    for i, idx in enumerate(tqdm(loop.batches(True), desc="  noise", leave=False)):
        draws = draw_noise_batch(loop, idx, shuffle)
        if not loop.mine(i):  # another rank's batch (its draws above keep gen in step)
            continue
        delta, loss = noise_batch(loop, idx, draws, minimize)
        keep = store.protect[idx]
        store.write_noise(idx[keep], delta[keep.to(delta.device)])
        total, count = total + float(loss) * len(idx), count + len(idx)
    if loop.world.active:
        store.noise[1 - store.current].flush()
    total, count = distributed.sum_scalars(loop.world, total, count)  # also: all have written
    return total / max(count, 1)


def noise_batch(
    loop: Loop, idx: torch.Tensor, draws: NoiseDraws, minimize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """S PGD steps for batch ``idx`` on ``loop.device``: (δ (B, 3, S, S), mean loss), both on
    the device (no host synchronisation)."""
    store, b = loop.store, len(idx)
    texts = torch.cat([shuffled_texts(loop, idx, draws.caps, draws.cols, p) for p in draws.perms])
    with torch.no_grad():  # the text is fixed during PGD: features once, no grad
        txt = loop.runtime.encode_text(texts).view(len(draws.perms), b, -1)
    x = store.clean_batch(idx, loop.device)
    delta = store.noise_batch(idx, loop.device)

    def loss_fn(x_adv: torch.Tensor, step: int) -> torch.Tensor:
        img = loop.runtime.encode_image(loop.augment(x_adv, draws.eot[step]))
        return loop.clip_loss(img, txt[step % len(txt)])

    return pgd(x, delta, loss_fn, len(draws.eot), loop.alpha, loop.eps, minimize)


def shuffled_texts(
    loop: Loop, idx: torch.Tensor, caps: torch.Tensor, cols: torch.Tensor | None, perm: torch.Tensor
) -> torch.Tensor:
    """Image ``idx[b]``'s trigger in caption ``caps[perm[b]]``. With per-image positions
    (``cols``), the trigger goes at its own image's word position, clamped to the borrowed
    caption's length (the column where that caption's tokens end, before its EOT)."""
    body = caps[perm]
    if cols is None:
        return loop.store.texts(idx, body, loop.with_trigger)
    end = (body == loop.store.eot_id).long().argmax(dim=1)  # EOT column of each body
    at = torch.minimum(cols, end.clamp(min=1))
    return loop.store.texts(idx, body, loop.with_trigger, at)
