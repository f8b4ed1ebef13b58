"""Differentiable transformations for EOT: what happens to a protected image before training.

Noise optimised on the exact pixel grid loses part of its effect once the image is resampled or
re-encoded; averaging the PGD (and surrogate) objective over random draws of the same
transformations (expectation over transformation, Athalye et al. 2018) makes the perturbation
survive them:

    δ ← δ − α · sign(∇δ E_{t∼T} L(t(x + δ)))

``poison.eot`` picks T, applied in the order the data meets them (:func:`eot`):

- ``resize``: a scraper resizes to a random short side s·S (s log-uniform in ``poison.eot_resize``)
  and the victim's preprocessing brings it back to S (antialiased, :func:`random_resize`);
- ``jpeg``: re-encoding at a random quality in ``poison.eot_jpeg_quality`` (:mod:`.diffjpeg`);
- ``crop``: the victim trainer's random-resized-crop. open_clip_train (open_clip 3.3
  ``image_transform``, ``is_train=True``) uses ``RandomResizedCrop(size, scale=(0.9, 1.0))``
  (torchvision's ratio (3/4, 4/3)) with ``InterpolationMode.BICUBIC``; ``poison.eot_interpolation:
  bicubic`` matches it, ``bilinear`` (the default until measured) is what mme always used.

This goes beyond the MEM paper's algorithm and is switched by ``poison.augment``. Which
combination protects best is not measured yet: the defaults (``[crop]``, bilinear) are the
behaviour before these options existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mme.protection.methods.diffjpeg import diff_jpeg

EOT_KINDS = ("resize", "jpeg", "crop")


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mode: str = "bilinear",
) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) to a random box and resize back to (H, W).

    Box area is a fraction U(scale) of the image, aspect ratio log-uniform in ``ratio``; the
    box is clipped to the image and placed uniformly. ``mode`` (``bilinear`` or ``bicubic``, the
    victim's) resamples; both are differentiable w.r.t. ``x``. Random numbers come from ``gen``
    (CPU) so runs are reproducible.
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
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def random_resize(
    x: torch.Tensor, gen: torch.Generator, factor: tuple[float, float], mode: str = "bilinear"
) -> torch.Tensor:
    """Resize ``x`` so its short side is s times its own (s log-uniform in ``factor``, one draw
    per batch) and back to (H, W), antialiased both ways: a scraper's resize followed by the
    victim's preprocessing."""
    h, w = x.shape[-2:]
    s = math.exp(torch.empty(()).uniform_(*map(math.log, factor), generator=gen).item())
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return x
    y = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return F.interpolate(y, size=(h, w), mode=mode, antialias=True, align_corners=False)


def random_jpeg(x: torch.Tensor, gen: torch.Generator, quality: tuple[int, int]) -> torch.Tensor:
    """Differentiable JPEG at a quality drawn uniformly from ``quality`` (inclusive) per image."""
    q = torch.randint(quality[0], quality[1] + 1, (x.shape[0],), generator=gen)
    return diff_jpeg(x, q.to(x.device))


def eot(
    x: torch.Tensor,
    gen: torch.Generator,
    kinds: tuple[str, ...] | list[str] = ("crop",),
    mode: str = "bilinear",
    resize: tuple[float, float] = (0.5, 2.0),
    jpeg_quality: tuple[int, int] = (50, 95),
) -> torch.Tensor:
    """One random draw of the chosen transformations ``kinds`` (``resize``, ``jpeg``, ``crop``),
    always in that order whatever the order of ``kinds``; random numbers from ``gen``."""
    unknown = set(kinds) - set(EOT_KINDS)
    if unknown:
        raise ValueError(f"unknown EOT transformation(s) {sorted(unknown)} (allowed: {EOT_KINDS})")
    if "resize" in kinds:
        x = random_resize(x, gen, resize, mode)
    if "jpeg" in kinds:
        x = random_jpeg(x, gen, jpeg_quality)
    if "crop" in kinds:
        x = random_resized_crop(x, gen, mode=mode)
    return x
