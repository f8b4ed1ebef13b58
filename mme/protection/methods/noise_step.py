"""Step 3 of a round: S steps of PGD (``pgd.py``) for every protected image, written to the
store's next noise buffer.

``minimize=True``: error-minimising noise (MEM, ``em``); ``False``: error-maximising (``errmax``).
With ``shuffle`` (MEM) the caption bodies are shuffled within the batch at every PGD step while
each trigger stays with its own image: the loss can then only be lowered by binding the noise to
the trigger. Each step sees one EOT draw of the noisy image.

Under torchrun each rank takes every ``world``-th batch and writes its rows of the shared file.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mme import distributed
from mme.protection.methods.loop import Loop
from mme.protection.methods.pgd import pgd


def update_noise(loop: Loop, minimize: bool, shuffle: bool) -> float:
    """S PGD steps for every protected image; mean loss of the last step."""
    store, s = loop.store, loop.cfg.pgd_steps
    total, count = 0.0, 0
    if loop.world.main:  # one copy of the shared file; the ranks then write disjoint rows
        store.begin_round()
        store.noise[1 - store.current].flush()
    distributed.barrier(loop.world)
    for i, idx in enumerate(tqdm(loop.batches(True), desc="  noise", leave=False)):
        b = len(idx)
        caps, cols = store.pick_captions(idx, loop.gen)
        # MEM: a new shuffle of the caption bodies at every step; otherwise captions stay put
        perms = [torch.randperm(b, generator=loop.gen) for _ in range(s)]
        perms = perms if shuffle else [torch.arange(b)]
        if not loop.mine(i):  # another rank's batch (its draws above keep gen in step)
            continue
        texts = torch.cat([shuffled_texts(loop, idx, caps, cols, p) for p in perms])
        with torch.no_grad():  # the text is fixed during PGD: features once, no grad
            txt = loop.runtime.encode_text(texts).view(len(perms), b, -1)
        x = store.clean_batch(idx, loop.device)
        delta = store.noise_batch(idx, loop.device)

        def loss_fn(x_adv: torch.Tensor, step: int, txt=txt) -> torch.Tensor:
            img = loop.runtime.encode_image(loop.augment(x_adv))
            return loop.clip_loss(img, txt[step % len(txt)])

        delta, loss = pgd(x, delta, loss_fn, s, loop.alpha, loop.eps, minimize)
        store.write_noise(idx, delta)
        total, count = total + float(loss) * b, count + b
    if loop.world.active:
        store.noise[1 - store.current].flush()
    total, count = distributed.sum_scalars(loop.world, total, count)  # also: all have written
    return total / max(count, 1)


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
