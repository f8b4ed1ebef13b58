"""Differentiable JPEG approximation, for EOT against re-encoding (``poison.eot: [jpeg]``).

Spec (baseline JPEG, ITU-T T.81, with the IJG quality scaling; differentiable rounding of Shin and
Song 2017, "JPEG-resistant Adversarial Images", NeurIPS workshop on ML and Computer Security):

    YCbCr = M · RGB·255 + (0, 128, 128)            (JFIF colour transform)
    Cb, Cr ← 2×2 average, repeated back             (4:2:0 chroma subsampling, Pillow's default)
    F = D · (block − 128) · Dᵀ                      (8×8 orthonormal DCT-II per block)
    F̂ = q · r(F / q),  r(t) = ⌊t⌉ + (t − ⌊t⌉)³      (quantisation; r ≈ rounding, with a gradient)
    RGB = M⁻¹ · (Dᵀ · F̂ · D + 128 − (0, 128, 128)) / 255

``q`` is the standard luminance / chrominance table (T.81 Annex K) scaled for quality Q as libjpeg
does: s = 5000/Q for Q < 50, 200 − 2Q otherwise; q = clamp(⌊(T·s + 50)/100⌋, 1, 255). Shapes:
``x`` (B, 3, H, W) in [0, 1] (any H, W: edges are padded to a multiple of 16 and cropped back);
``quality`` (B,) per image. Entropy coding is lossless and is left out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)
RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


def dct_matrix() -> torch.Tensor:
    """The 8×8 orthonormal DCT-II matrix D (rows: frequencies)."""
    k = torch.arange(8, dtype=torch.float64)[:, None]
    n = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.float()


def quant_tables(quality: torch.Tensor) -> torch.Tensor:
    """(B,) qualities in [1, 100] -> (B, 3, 8, 8) tables (Y, Cb, Cr), libjpeg scaling."""
    q = quality.float().clamp(1, 100)[:, None, None]
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    tables = [LUMA_TABLE, CHROMA_TABLE, CHROMA_TABLE]  # on quality's device (CUDA under EOT)
    base = torch.tensor(tables, dtype=torch.float32, device=quality.device)
    tables = [((base[c] * scale + 50) / 100).floor().clamp(1, 255) for c in range(3)]
    return torch.stack(tables, dim=1)


def soft_round(t: torch.Tensor) -> torch.Tensor:
    """⌊t⌉ + (t − ⌊t⌉)³: rounding in the forward pass, a non-zero gradient (Shin and Song)."""
    r = torch.round(t).detach()
    return r + (t - r) ** 3


def diff_jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG-compress-and-decode ``x`` (B, 3, H, W) in [0, 1] at ``quality`` (B,), differentiably."""
    b, _, h, w = x.shape
    dtype = x.dtype
    x = x.float()
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    m = torch.tensor(RGB_TO_YCBCR, device=x.device)
    offset = torch.tensor([0.0, 128.0, 128.0], device=x.device)[:, None, None]
    ycc = torch.einsum("ij,bjhw->bihw", m, x * 255) + offset
    chroma = F.avg_pool2d(ycc[:, 1:], 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    ycc = torch.cat([ycc[:, :1], chroma], dim=1) - 128
    d = dct_matrix().to(x.device)
    hh, ww = ycc.shape[-2] // 8, ycc.shape[-1] // 8
    blocks = ycc.reshape(b, 3, hh, 8, ww, 8).permute(0, 1, 2, 4, 3, 5)
    coef = d @ blocks @ d.T
    q = quant_tables(quality).to(x.device)[:, :, None, None]
    coef = soft_round(coef / q) * q
    blocks = d.T @ coef @ d
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, 3, hh * 8, ww * 8) + 128 - offset
    rgb = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), ycc) / 255
    return rgb[..., :h, :w].clamp(0, 1).to(dtype)
