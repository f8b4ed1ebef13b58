"""Image<->text retrieval metrics (R@K, median and mean rank, rsum) and their exact chance levels.

Scores are cosine similarities. Each direction is ranked from its own score matrix: image->text
from the rows of ``image @ text.T`` (a query image against all M captions), text->image from the
rows of ``text @ image.T`` (a query caption against all N images). The MEM paper's released code
re-read the image->text rows for text->image, so its two directions came out identical; two
separate passes make that mistake impossible here.

Ranks are 1-based: 1 + the number of candidates that beat the query's positive. Ties:

- ``ties="optimistic"`` (default, the usual convention): a candidate beats the positive only
  with a strictly greater score, so a tie ranks the positive first.
- ``ties="pessimistic"``: a negative with an equal score beats it too, so a tie ranks it last.

Exact ties are rare for real embeddings but universal for collapsed ones (all embeddings equal,
or all zero): then optimistic reports 100 % recall and pessimistic 0 %. A large gap between the
two modes therefore flags a degenerate model; neither number is its retrieval ability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Ties = Literal["optimistic", "pessimistic"]
KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")


def caption_index(captions_per_image: Sequence[int] | Tensor) -> Tensor:
    """``(N,)`` caption counts -> ``(M,)`` long image index of each caption, ``M = sum(counts)``.

    Captions are taken as grouped by image, in image order: ``[0]*c_0 + [1]*c_1 + ...``.
    Every count must be >= 1.
    """
    counts = _counts(captions_per_image)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def chance_metrics(
    n_images: int, captions_per_image: int | Sequence[int] | Tensor
) -> dict[str, float]:
    """Exact expected R@{1,5,10} (percent) of a uniformly random ranking, and their sum.

    ``captions_per_image``: one int for all images, or ``(N,)`` counts, each >= 1.
    text->image: a caption ranks the N images, so ``P(hit@K) = min(K, N) / N``.
    image->text: image i owns c_i of the M captions, so ``P(hit@K) = 1 - C(M-c_i, K) / C(M, K)``
    (hypergeometric: none of its positives among K draws), averaged over images.
    Keys: ``chance_i2t_r{1,5,10}``, ``chance_t2i_r{1,5,10}``, ``chance_rsum``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if isinstance(captions_per_image, int):
        captions_per_image = [captions_per_image] * n_images
    counts = _counts(captions_per_image)
    if len(counts) != n_images:
        raise ValueError(f"{len(counts)} caption counts given for {n_images} images")
    m = int(counts.sum())
    out = {f"chance_i2t_r{k}": 100.0 * float(_p_any_in_top_k(counts, m, k).mean()) for k in KS}
    out |= {f"chance_t2i_r{k}": 100.0 * min(k, n_images) / n_images for k in KS}
    out["chance_rsum"] = sum(out.values())
    return out


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    chunk: int = 1024,
    ties: Ties = "optimistic",
) -> dict[str, float]:
    """Image->text and text->image retrieval over cosine similarity.

    image_emb ``(N, D)``, text_emb ``(M, D)``: any scale (L2-normalised here), finite.
    text_to_image ``(M,)`` integer: the image each caption describes; every image needs >= 1.
    chunk: query rows scored at once; peak memory ~ ``chunk * max(N, M)`` floats.
    ties: how equal scores rank, see the module docstring.
    Returns ``{i2t,t2i}_r{1,5,10}`` (percent), ``{i2t,t2i}_{medr,meanr}`` (1-based ranks;
    an image's rank is that of its best-ranked caption), ``rsum`` (sum of the six recalls),
    ``n_images``, ``n_captions``, the :func:`chance_metrics` keys and ``rsum_over_chance``.
    """
    img, txt, owner = _validated(image_emb, text_emb, text_to_image, chunk, ties)
    pessimistic = ties == "pessimistic"
    out = _summary("i2t", _i2t_ranks(img, txt, owner, chunk, pessimistic))
    out |= _summary("t2i", _t2i_ranks(img, txt, owner, chunk, pessimistic))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in DIRECTIONS for k in KS)
    out["n_images"], out["n_captions"] = len(img), len(txt)
    out |= chance_metrics(len(img), torch.bincount(owner, minlength=len(img)).cpu())
    out["rsum_over_chance"] = out["rsum"] / out["chance_rsum"]
    return out


def _i2t_ranks(img: Tensor, txt: Tensor, owner: Tensor, chunk: int, pessimistic: bool) -> Tensor:
    """``(N,)`` 0-based rank, among all M captions, of each image's best-ranked caption."""
    n = len(img)
    ranks = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        scores = img[s:e] @ txt.T  # (c, M)
        cap = ((owner >= s) & (owner < e)).nonzero().squeeze(1)  # captions of this chunk's images
        row = owner[cap] - s
        # Positive scores are read from this same matrix, so comparisons with them are exact.
        pos = scores[row, cap]
        # The best positive alone sets the rank: every other positive scores no higher.
        best = torch.full((e - s,), -math.inf, dtype=scores.dtype, device=scores.device)
        best = best.scatter_reduce(0, row, pos, "amax")
        if pessimistic:
            # Every caption tied with the best counts, except the positives tied with it.
            tied_pos = torch.zeros(e - s, dtype=torch.long, device=scores.device)
            tied_pos.index_add_(0, row, (pos == best[row]).long())
            ranks.append((scores >= best[:, None]).sum(1) - tied_pos)
        else:
            ranks.append((scores > best[:, None]).sum(1))
    return torch.cat(ranks)


def _t2i_ranks(img: Tensor, txt: Tensor, owner: Tensor, chunk: int, pessimistic: bool) -> Tensor:
    """``(M,)`` 0-based rank of each caption's own image among all N images."""
    ranks = []
    for s in range(0, len(txt), chunk):
        scores = txt[s : s + chunk] @ img.T  # (c, N)
        pos = scores.gather(1, owner[s : s + chunk, None])  # (c, 1), from this same matrix
        if pessimistic:
            ranks.append((scores >= pos).sum(1) - 1)  # -1: the positive ties with itself
        else:
            ranks.append((scores > pos).sum(1))
    return torch.cat(ranks)


def _summary(direction: str, rank0: Tensor) -> dict[str, float]:
    """0-based ranks ``(Q,)`` -> R@{1,5,10} in percent, medr and meanr (1-based)."""
    out = {f"{direction}_r{k}": 100.0 * float((rank0 < k).double().mean()) for k in KS}
    r = rank0.double().sort().values
    # np.floor(np.median(rank0)) + 1, the VSE++ / CLIP-benchmark convention: for an even count
    # numpy's median averages the two middle ranks, and the floor takes it back to a whole rank.
    median = float(r[(len(r) - 1) // 2] + r[len(r) // 2]) / 2
    out[f"{direction}_medr"] = float(math.floor(median) + 1)
    out[f"{direction}_meanr"] = float(r.mean()) + 1.0
    return out


def _p_any_in_top_k(counts: Tensor, m: int, k: int) -> Tensor:
    """``(N,)`` P(at least one of c_i marked items lands in the top k of m shuffled items)."""
    # C(m-c, k) / C(m, k) = prod_{t<k} (m-c-t) / (m-t): every factor lies in [0, 1], so unlike
    # factorials nothing overflows. A factor <= 0 means fewer than k unmarked items exist, so a
    # marked one is certain to be drawn: clamping it to 0 zeroes the miss probability. k > m
    # stops at t = m - 1, where the denominator is still >= 1.
    t = torch.arange(min(k, m), dtype=torch.float64)
    c = counts.to(torch.float64)[:, None]
    return 1.0 - ((m - c - t).clamp(min=0) / (m - t)).prod(dim=1)


def _counts(captions_per_image: Sequence[int] | Tensor) -> Tensor:
    """Caption counts as a ``(N,)`` long tensor, each >= 1, or ValueError."""
    counts = torch.as_tensor(captions_per_image)
    if counts.ndim != 1 or len(counts) == 0 or counts.is_floating_point() or counts.is_complex():
        raise ValueError(f"caption counts must be a non-empty 1-D list of ints, got {counts}")
    if (counts < 1).any():
        raise ValueError(f"every image needs >= 1 caption; counts {counts.tolist()[:20]}")
    return counts.long()


def _validated(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk: int, ties: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes and values; return unit-norm image, text embeddings and the caption owners."""
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        shapes = f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        raise ValueError(f"need (N, D) and (M, D) embeddings, got {shapes}")
    n, m = len(image_emb), len(text_emb)
    if n == 0 or m == 0:
        raise ValueError(f"need at least one image and one caption, got N={n}, M={m}")
    t2i = text_to_image
    if t2i.shape != (m,) or t2i.is_floating_point() or t2i.is_complex():
        got = f"{t2i.dtype} {tuple(t2i.shape)}"
        raise ValueError(f"text_to_image must be ({m},) integer, got {got}")
    if chunk < 1 or ties not in ("optimistic", "pessimistic"):
        raise ValueError(f"need chunk >= 1 and ties optimistic|pessimistic, got {chunk}, {ties!r}")
    # NaN compares false with everything, so NaN scores would rank every positive first: a
    # diverged model would score 100 %. Refuse instead.
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        raise ValueError("embeddings contain NaN or inf")
    owner = text_to_image.to(image_emb.device, torch.long)
    if owner.min() < 0 or owner.max() >= n:
        got = f"[{int(owner.min())}, {int(owner.max())}]"
        raise ValueError(f"text_to_image values must lie in [0, {n}), got {got}")
    missing = (torch.bincount(owner, minlength=n) == 0).nonzero().squeeze(1)
    if len(missing):
        raise ValueError(f"{len(missing)} images have no caption, e.g. {missing[:10].tolist()}")
    # float32 unless the caller chose float64: half-precision matmuls are slow on CPU and coarse.
    dtype = torch.float64 if torch.float64 in (image_emb.dtype, text_emb.dtype) else torch.float32
    img = F.normalize(image_emb.detach().to(dtype), dim=1)
    txt = F.normalize(text_emb.detach().to(device=image_emb.device, dtype=dtype), dim=1)
    return img, txt, owner
