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
    """One HotFlip pass over all protected pairs; mean own loss term after the update."""
    store, rt = loop.store, loop.runtime
    allowed = loop.allowed.to(loop.device)
    emb = loop.model.token_embedding.weight.detach()
    k, total, count = loop.cfg.trigger_len, 0.0, 0
    owned = torch.zeros(store.n, dtype=torch.bool)
    for i, idx in enumerate(tqdm(loop.batches(True), desc="  triggers", leave=False)):
        # drawn by every rank: keeps gen in step
        caps, cols = store.pick_captions(idx, loop.gen)
        if not loop.mine(i):
            continue
        owned[idx] = True
        with torch.no_grad():
            img = rt.encode_image(store.images(idx, loop.device))
        trig = store.triggers[idx].to(loop.device)
        tokens = store.texts(idx, caps, True, cols).to(loop.device)
        grad = hotflip.trigger_gradients(
            loop.model, tokens, img, k, loop.clip_loss, rt.text_features, cols
        )
        cands = hotflip.top_candidates(grad, emb, allowed, loop.cfg.candidates)

        def build(t: torch.Tensor, caps=caps, cols=cols) -> torch.Tensor:
            # each row's candidates are evaluated at that row's own trigger columns
            reps = t.shape[0] // len(caps)
            rows = caps.repeat_interleave(reps, 0).to(t.device)
            at = None if cols is None else cols.repeat_interleave(reps, 0)
            return insert_trigger(rows, t, store.eot_id, at)

        new, own = hotflip.greedy_flip(rt.encode_text, build, trig, cands, img, rt.scale())
        store.triggers[idx] = new.cpu()
        total, count = total + float(own.sum()), count + len(idx)
    if loop.world.active:
        share_triggers(loop, owned)
    total, count = distributed.sum_scalars(loop.world, total, count)
    return total / max(count, 1)


def share_triggers(loop: Loop, owned: torch.Tensor) -> None:
    """Every rank gets each trigger from the rank that updated it (each row has one owner)."""
    store = loop.store
    mine = torch.where(owned[:, None], store.triggers, 0)
    updated = distributed.all_sum_(loop.world, owned.long())
    new = distributed.all_sum_(loop.world, mine)
    store.triggers = torch.where(updated[:, None] > 0, new, store.triggers)
