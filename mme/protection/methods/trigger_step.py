"""Step 2 of a round (rounds < H): one HotFlip pass over all protected pairs (``hotflip.py``).

For each batch the surrogate is frozen; each image's trigger gets the gradient of the loss
w.r.t. its token embeddings, the ``candidates`` best tokens per position (from the allowed
vocabulary), and a greedy flip that keeps the change only when it lowers the image's own loss.

Under torchrun each rank takes every ``world``-th batch (the surrogate is frozen, so batches are
independent), then the ranks exchange the triggers they changed.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mme import distributed
from mme.protection.methods import hotflip
from mme.protection.methods.loop import Loop
from mme.protection.methods.triggers import insert_trigger


def update_triggers(loop: Loop) -> float:
    """One HotFlip pass over all protected pairs; mean own loss term (of the protected pairs)
    after the update."""
    store = loop.store
    total, count = 0.0, 0
    owned = torch.zeros(store.n, dtype=torch.bool)
    for i, idx in enumerate(tqdm(loop.batches(True), desc="  triggers", leave=False)):
        # drawn by every rank: keeps gen in step
        caps, cols = store.pick_captions(idx, loop.gen)
        if not loop.mine(i):
            continue
        keep = store.protect[idx]  # all rows but a lone protected image's negative
        new, own = trigger_batch(loop, idx, caps, cols)
        owned[idx[keep]] = True
        store.triggers[idx[keep]] = new[keep.to(new.device)].cpu()
        own = own[keep.to(own.device)]
        total, count = total + float(own.sum()), count + len(own)
    if loop.world.active:
        share_triggers(loop, owned)
    total, count = distributed.sum_scalars(loop.world, total, count)
    return total / max(count, 1)


def trigger_batch(
    loop: Loop, idx: torch.Tensor, caps: torch.Tensor, cols: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HotFlip for batch ``idx`` with captions ``caps`` (B, L) on ``loop.device``: the new
    triggers (B, k) and each pair's own loss term (B,), both on the device. Rows of unprotected
    images (a lone protected image's negative) carry no trigger."""
    store, rt, k = loop.store, loop.runtime, loop.cfg.trigger_len
    keep = store.protect[idx]
    with torch.no_grad():
        img = rt.encode_image(store.images(idx, loop.device))
    trig = store.triggers[idx].to(loop.device)
    tokens = store.texts(idx, caps, True, cols).to(loop.device)
    grad = hotflip.trigger_gradients(
        loop.model, tokens, img, k, loop.clip_loss, rt.text_features, cols
    )
    emb = loop.model.token_embedding.weight.detach()
    cands = hotflip.top_candidates(grad, emb, loop.allowed.to(loop.device), loop.cfg.candidates)

    def build(t: torch.Tensor) -> torch.Tensor:
        # each row's candidates are evaluated at that row's own trigger columns
        reps = t.shape[0] // len(caps)
        rows = caps.repeat_interleave(reps, 0).to(t.device)
        at = None if cols is None else cols.repeat_interleave(reps, 0)
        on = keep.repeat_interleave(reps, 0).to(t.device)[:, None]
        return torch.where(on, insert_trigger(rows, t, store.eot_id, at), rows)

    return hotflip.greedy_flip(rt.encode_text, build, trig, cands, img, rt.scale())


def share_triggers(loop: Loop, owned: torch.Tensor) -> None:
    """Every rank gets each trigger from the rank that updated it (each row has one owner)."""
    store = loop.store
    mine = torch.where(owned[:, None], store.triggers, 0)
    updated = distributed.all_sum_(loop.world, owned.long())
    new = distributed.all_sum_(loop.world, mine)
    store.triggers = torch.where(updated[:, None] > 0, new, store.triggers)
