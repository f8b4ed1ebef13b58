"""HotFlip search for per-sample text triggers that minimise the contrastive loss.

Spec (Ebrahimi et al. 2018, "HotFlip"; as used by MEM, arXiv 2407.16307 Alg. 1):

1. Gradient ``g`` of the contrastive loss w.r.t. the trigger token embeddings, ``(B, k, W)``,
   gathered at each sample's own trigger columns (``pos[b] .. pos[b] + k - 1``; 1..k when the
   trigger follows the start token).
2. First-order score of swapping position p to token v: ``−g[b, p] · E[v]`` (E the ``(V, W)``
   token embedding matrix); keep the top ``C`` allowed tokens per sample and position (paper: 16).
3. Greedy, position by position: evaluate every candidate exactly and keep, **per sample**, the
   one that lowers that sample's own loss term (the released code picks one candidate column for
   the whole batch). Image features are computed once per batch; only the text changes.

A sample's own term, with the other samples' texts held fixed, is
``½ [CE(row i of image→text logits, i) + CE(text→image logits of text i, i)]``; it is evaluated for
all ``B × C`` candidates at once with the current texts' logits as the shared negatives. Those
negatives change whenever other samples flip, so before each position every sample's current term
is recomputed against them: a candidate replaces the current token only if it beats the current
token *under the same negatives*, and the returned terms are those of the final texts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mme.protection.methods.triggers import gather_trigger

EncodeText = Callable[[torch.Tensor], torch.Tensor]  # (n, L) tokens -> (n, D) unit features


def own_loss_terms(
    img: torch.Tensor, txt_cur: torch.Tensor, txt_new: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Each sample's loss term if its text became ``txt_new``, the others staying ``txt_cur``.

    img, txt_cur: (B, D) unit features; txt_new: (B, C, D); scale: logit scale (exp'd).
    Returns (B, C). With ``txt_new = txt_cur[:, None]`` this is the current per-sample term.
    """
    b = img.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=img.device)
    logits_cur = scale * img @ txt_cur.T  # (B, B) image i vs current text j
    lse_others = logits_cur.masked_fill(eye, float("-inf")).logsumexp(dim=1)  # (B,)
    pos = scale * torch.einsum("bd,bcd->bc", img, txt_new)  # (B, C) own pair score
    i2t = torch.logaddexp(lse_others[:, None], pos) - pos
    t2i = (scale * torch.einsum("bcd,jd->bcj", txt_new, img)).logsumexp(dim=2) - pos
    return 0.5 * (i2t + t2i)


def trigger_gradients(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    img: torch.Tensor,
    k: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    encode: EncodeText | None = None,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """∂loss/∂(embeddings of each row's trigger tokens), shape (B, k, W).

    ``tokens`` (B, L) already hold the triggers at columns ``pos[b] .. pos[b] + k - 1`` (``pos``
    (B,), default: 1 for every row, right after the start token); ``loss_fn(img, txt)`` is the
    batch contrastive loss; ``encode`` (default ``model.encode_text``) maps tokens to features
    through ``model.token_embedding``. A forward hook swaps the token-embedding output for a
    leaf tensor so only that gradient is computed (no parameter gradients).
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured["emb"] = leaf
        return leaf

    handle = model.token_embedding.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            txt = F.normalize((encode or model.encode_text)(tokens), dim=-1)
            (grad,) = torch.autograd.grad(loss_fn(img, txt), captured["emb"])
    finally:
        handle.remove()
    if pos is None:
        return grad[:, 1 : 1 + k].float()
    return gather_trigger(grad, pos, k).float()


@torch.no_grad()
def top_candidates(
    grad: torch.Tensor, embedding: torch.Tensor, allowed: torch.Tensor, n: int
) -> torch.Tensor:
    """Top-``n`` token ids per sample and position by the score ``−grad · E``: (B, k, n)."""
    score = -torch.einsum("bkw,vw->bkv", grad, embedding.float())
    score[..., ~allowed] = float("-inf")
    return score.topk(n, dim=-1).indices


@torch.no_grad()
def greedy_flip(
    encode: EncodeText,
    build: Callable[[torch.Tensor], torch.Tensor],
    trigger: torch.Tensor,
    cands: torch.Tensor,
    img: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy position-by-position choice among ``cands`` (B, k, C), per sample.

    ``build(trigger (n, k)) -> tokens (n, L)`` rebuilds the texts of the batch rows (repeated
    ``C`` times in candidate order); ``encode`` maps tokens to unit features. Returns the new
    triggers (B, k) and each sample's final own loss term (B,).
    """
    b, k, c = cands.shape
    trigger = trigger.clone()
    txt_cur = encode(build(trigger))  # (B, D)
    rows = torch.arange(b, device=trigger.device)
    for p in range(k):
        # other samples' flips at p - 1 changed the shared negatives: re-score the current texts
        cur = own_loss_terms(img, txt_cur, txt_cur[:, None], scale)[:, 0]
        trial = trigger[:, None, :].repeat(1, c, 1)  # (B, C, k)
        trial[:, :, p] = cands[:, p, :]
        txt_new = encode(build(trial.reshape(b * c, k))).reshape(b, c, -1)
        loss = own_loss_terms(img, txt_cur, txt_new, scale)  # (B, C)
        best, arg = loss.min(dim=1)
        better = best < cur  # keep the current token unless a candidate lowers the loss
        trigger[better, p] = cands[rows, p, arg][better]
        txt_cur = torch.where(better[:, None], txt_new[rows, arg], txt_cur)
    return trigger, own_loss_terms(img, txt_cur, txt_cur[:, None], scale)[:, 0]
