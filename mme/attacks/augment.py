"""Differentiable random-resized-crop, the victim trainer's augmentation, for EOT.

open_clip's training transform is ``RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3))``
with bicubic resampling. Noise optimised on the exact pixel grid loses part of its effect once the
victim resamples it; averaging the PGD objective over the same random crops (expectation over
transformation, Athalye et al. 2018) makes the perturbation survive them. This goes beyond the
MEM paper's algorithm and is switched by ``poison.augment``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) to a random box and resize back to (H, W).

    Box area is a fraction U(scale) of the image, aspect ratio log-uniform in ``ratio``; the
    box is clipped to the image and placed uniformly. Bilinear sampling keeps it differentiable
    w.r.t. ``x``. Random numbers come from ``gen`` (CPU) so runs are reproducible.
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=gen)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # box size relative to the image side
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
