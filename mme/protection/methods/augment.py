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

Each transformation is a *draw* (:func:`draw_eot`: random numbers from ``gen`` for a whole
batch of B images, an :class:`EotDraw`) and an *application* (:meth:`EotDraw.apply`) to the
batch or to any of its rows (:meth:`EotDraw.rows`). Under torchrun every rank draws for the whole
batch from the shared generator and applies its own rows, so image i gets the same
transformation whatever the number of processes (``rng.py``).

This goes beyond the MEM paper's algorithm and is switched by ``poison.augment``. Which
combination protects best is not measured yet: the defaults (``[crop]``, bilinear) are the
behaviour before these options existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mme.protection.methods.diffjpeg import diff_jpeg

EOT_KINDS = ("resize", "jpeg", "crop")


@dataclass(frozen=True)
class EotDraw:
    """One random draw of the EOT transformations for a batch of B images (:func:`draw_eot`).

    ``resize``: one short-side factor for the batch (None: no resize); ``quality``: (B,) JPEG
    qualities (None: no JPEG); ``boxes``: (B, 4) crop boxes ``(w, h, cx, cy)`` in [−1, 1]
    coordinates (None: no crop); ``mode``: the resampling."""

    mode: str = "bilinear"
    resize: float | None = None
    quality: torch.Tensor | None = None
    boxes: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor) -> EotDraw:
        """The draw of images ``rows`` of the batch (a rank's share of it)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return EotDraw(self.mode, self.resize, pick(self.quality), pick(self.boxes))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) through the drawn transformations: resize, jpeg, crop, in order."""
        if self.resize is not None:
            x = resize_by(x, self.resize, self.mode)
        if self.quality is not None:
            x = diff_jpeg(x, self.quality.to(x.device))
        if self.boxes is not None:
            x = crop_boxes(x, self.boxes, self.mode)
        return x


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[rows]


def draw_boxes(
    b: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """(b, 4) random crop boxes ``(w, h, cx, cy)``: area a fraction U(scale) of the image,
    aspect ratio log-uniform in ``ratio``, clipped to the image and placed uniformly."""
    area = torch.empty(b).uniform_(*scale, generator=gen)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # box size relative to the image side
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    return torch.stack([w, h, cx, cy], dim=1)


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) to its box (B, 4) and resize back to (H, W);
    ``mode`` (``bilinear`` or ``bicubic``) resamples, differentiably w.r.t. ``x``."""
    w, h, cx, cy = boxes.unbind(1)
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mode: str = "bilinear",
) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) to a random box (:func:`draw_boxes`) and resize
    back to (H, W) (:func:`crop_boxes`). Random numbers come from ``gen`` (CPU) so runs are
    reproducible."""
    return crop_boxes(x, draw_boxes(x.shape[0], gen, scale, ratio), mode)


def draw_resize(gen: torch.Generator, factor: tuple[float, float]) -> float:
    """A short-side factor s, log-uniform in ``factor`` (one draw per batch)."""
    return math.exp(torch.empty(()).uniform_(*map(math.log, factor), generator=gen).item())


def resize_by(x: torch.Tensor, s: float, mode: str = "bilinear") -> torch.Tensor:
    """Resize ``x`` so its short side is s times its own and back to (H, W), antialiased both
    ways: a scraper's resize followed by the victim's preprocessing."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return x
    y = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return F.interpolate(y, size=(h, w), mode=mode, antialias=True, align_corners=False)


def random_resize(
    x: torch.Tensor, gen: torch.Generator, factor: tuple[float, float], mode: str = "bilinear"
) -> torch.Tensor:
    """:func:`resize_by` a random factor (:func:`draw_resize`)."""
    return resize_by(x, draw_resize(gen, factor), mode)


def draw_quality(b: int, gen: torch.Generator, quality: tuple[int, int]) -> torch.Tensor:
    """(b,) JPEG qualities, uniform in ``quality`` (inclusive)."""
    return torch.randint(quality[0], quality[1] + 1, (b,), generator=gen)


def random_jpeg(x: torch.Tensor, gen: torch.Generator, quality: tuple[int, int]) -> torch.Tensor:
    """Differentiable JPEG at a quality drawn uniformly from ``quality`` (inclusive) per image."""
    return diff_jpeg(x, draw_quality(x.shape[0], gen, quality).to(x.device))


def draw_eot(
    b: int,
    gen: torch.Generator,
    kinds: tuple[str, ...] | list[str] = ("crop",),
    mode: str = "bilinear",
    resize: tuple[float, float] = (0.5, 2.0),
    jpeg_quality: tuple[int, int] = (50, 95),
) -> EotDraw:
    """One random draw of the chosen transformations ``kinds`` (``resize``, ``jpeg``, ``crop``)
    for a batch of ``b`` images, drawn from ``gen`` in that order whatever the order of
    ``kinds``."""
    unknown = set(kinds) - set(EOT_KINDS)
    if unknown:
        raise ValueError(f"unknown EOT transformation(s) {sorted(unknown)} (allowed: {EOT_KINDS})")
    s = draw_resize(gen, resize) if "resize" in kinds else None
    q = draw_quality(b, gen, jpeg_quality) if "jpeg" in kinds else None
    boxes = draw_boxes(b, gen) if "crop" in kinds else None
    return EotDraw(mode, s, q, boxes)


def eot(
    x: torch.Tensor,
    gen: torch.Generator,
    kinds: tuple[str, ...] | list[str] = ("crop",),
    mode: str = "bilinear",
    resize: tuple[float, float] = (0.5, 2.0),
    jpeg_quality: tuple[int, int] = (50, 95),
) -> torch.Tensor:
    """One random draw of ``kinds`` for ``x`` (:func:`draw_eot`), applied to it."""
    return draw_eot(x.shape[0], gen, kinds, mode, resize, jpeg_quality).apply(x)
