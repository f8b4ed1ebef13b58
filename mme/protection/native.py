"""Protection at the source's own resolution: δ mapped from the working crop onto the original.

``mme poison`` optimises δ at the working size S: the clean image is resized so its short side is
S (bicubic) and centre-cropped to S × S (:func:`mme.imageops.to_working_resolution`). Here δ is
carried back through the same geometry: every native pixel centre (u + ½, v + ½) maps to working
coordinates x = (u + ½)·nw/W − left, y = (v + ½)·nh/H − top, where δ is sampled bicubically
(the victim's resampling; exact at a working-size image's own pixel centres); native
pixels outside the crop (the margins of a non-square photo) take δ mirrored at the crop's edge,
so the whole photo carries noise. Then

    δ_native ← clip(round(δ_native), −ε, ε)         (the L∞ bound re-imposed at native size)
    protected = clip(clean_native + δ_native, 0, 255)

so ``max |protected − clean| ≤ ε`` holds at native size (:func:`verify_native` checks it), and a
victim that resizes the photo back to S sees δ again (smoothed by the two resamplings). Images are
processed one at a time and δ is expanded in bands of rows, so neither a dataset nor one whole
native-size float field is ever held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mme import shards

BAND_ROWS = 256  # native rows expanded at a time: bounds memory for very large photos


def working_geometry(width: int, height: int, size: int) -> tuple[float, float, int, int]:
    """``(sx, sy, left, top)`` of :func:`mme.imageops.to_working_resolution`: the resized image
    is ``(W·sx) × (H·sy)`` and the crop starts at ``(left, top)`` in it."""
    if (width, height) == (size, size):
        return 1.0, 1.0, 0, 0
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw / width, nh / height, (nw - size) // 2, (nh - size) // 2


def native_noise(noise: np.ndarray, width: int, height: int, epsilon: float) -> np.ndarray:
    """δ of shape ``(3, S, S)`` (pixel units) -> ``(3, height, width)`` int16 within ±ε."""
    size = noise.shape[-1]
    sx, sy, left, top = working_geometry(width, height, size)
    src = torch.from_numpy(np.asarray(noise, dtype=np.float32))[None]
    gx = ((torch.arange(width, dtype=torch.float64) + 0.5) * sx - left) * 2 / size - 1
    out = np.empty((3, height, width), dtype=np.int16)
    bound = int(np.floor(epsilon))
    for r0 in range(0, height, BAND_ROWS):
        rows = torch.arange(r0, min(height, r0 + BAND_ROWS), dtype=torch.float64)
        gy = ((rows + 0.5) * sy - top) * 2 / size - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()
        band = F.grid_sample(
            src, grid, mode="bicubic", padding_mode="reflection", align_corners=False
        )
        out[:, r0 : r0 + len(rows)] = band[0].round().clamp(-bound, bound).to(torch.int16)
    return out


def protect_native(clean: np.ndarray, noise: np.ndarray, epsilon: float) -> np.ndarray:
    """``clip(clean + δ_native, 0, 255)``: clean ``(H, W, 3)`` uint8, δ ``(3, S, S)``."""
    h, w = clean.shape[:2]
    delta = native_noise(noise, w, h, epsilon).transpose(1, 2, 0)
    return np.clip(clean.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def _noise_rows(private: Path, size: int) -> tuple[np.ndarray, dict[str, int]]:
    """The private folder's noise.npy (memory-mapped) and its id -> row map (row order:
    triggers.json ids)."""
    noise_path = private / "noise.npy"
    if not noise_path.is_file():
        raise FileNotFoundError(
            f"{noise_path}: not found (--private: the poison run's private folder)"
        )
    noise = np.load(noise_path, mmap_mode="r", allow_pickle=False)
    ids = json.loads((private / "triggers.json").read_text()).get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{private}/triggers.json: no list of ids")
    if noise.ndim != 4 or noise.shape[1:] != (3, size, size) or len(noise) != len(ids):
        raise ValueError(
            f"{noise_path}: shape {noise.shape}, expected ({len(ids)}, 3, {size}, {size})"
        )
    if noise.dtype.kind != "i":
        raise ValueError(f"{noise_path}: dtype {noise.dtype}, expected integer pixel units")
    return noise, {i: r for r, i in enumerate(ids)}


def _recorded_clean(private: Path, manifest: dict[str, Any]) -> Path:
    """The clean folder the run was made from: the private ``triggers.json`` records it (the
    public manifest names no local path; sets made before that named it there)."""
    try:
        recorded = json.loads((private / "triggers.json").read_text()).get("clean")
    except (OSError, ValueError, AttributeError):
        recorded = None
    recorded = recorded or manifest.get("clean")
    if not isinstance(recorded, str) or not recorded:
        raise ValueError("native export needs the clean shards (--clean DIR)")
    return Path(recorded)


def _take(samples: Iterator[shards.Sample], waiting: dict[str, shards.Sample], key: str):
    """Sample ``key`` from ``samples``, buffering in ``waiting`` only those that come early (the
    two sets are normally in the same order, so nothing is buffered)."""
    while key not in waiting:
        s = next(samples, None)
        if s is None:
            raise ValueError(f"sample {key} is not in the clean set")
        waiting[s.id] = s
    return waiting.pop(key)


def native_samples(
    protected: Path, split: str, clean: Path | None = None, private: Path | None = None
) -> Iterator[shards.Sample]:
    """The protected samples of ``split`` with each image replaced by a PNG of the clean original
    at its native size plus δ_native (captions and metadata from the protected set). Streams:
    one native image in memory at a time."""
    protected = Path(protected)
    manifest = shards.load_manifest(protected)
    try:
        eps, size = float(manifest["config"]["epsilon"]), int(manifest["working_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{protected}/manifest.json lacks config.epsilon or working_size"
        ) from None
    if private is None:  # the public manifest does not say where the private folder is
        raise ValueError("native export needs the run's private folder (--private DIR)")
    clean = clean if clean is not None else _recorded_clean(Path(private), manifest)
    delta, row = _noise_rows(Path(private), size)
    originals, waiting = shards.iter_samples(clean, split), {}
    for p in shards.iter_samples(protected, split):
        if p.id not in row:
            raise ValueError(f"{protected}: sample {p.id} has no row in noise.npy")
        c = _take(originals, waiting, p.id)
        pixels = protect_native(c.image(), delta[row[p.id]], eps)
        png = shards.encode_png(pixels)
        meta = dict(p.meta, sha256=shards.sha256_bytes(png), native=True)
        meta["height"], meta["width"] = pixels.shape[:2]
        yield shards.Sample(p.id, png, "png", p.captions, meta)


@dataclass
class NativeReport:
    """Outcome of :func:`verify_native`: ok when every clean image has an exported image of the
    same size within ±ε, and the folder has no other images."""

    epsilon: float
    n_checked: int = 0
    max_linf: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.n_checked > 0 and not self.problems

    def add(self, kind: str, detail: str) -> None:
        self.problems.setdefault(kind, []).append(detail)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "epsilon": self.epsilon, "n_checked": self.n_checked,
                "max_linf": self.max_linf, "problems": self.problems}  # fmt: skip


def verify_native(clean: Path, folder: Path, epsilon: float, split: str = "train") -> NativeReport:
    """Check an ``mme export --native`` folder (``<id>.png``) against the clean originals at their
    own size: present, same width × height, ``max |exported − clean| ≤ ε``."""
    report = NativeReport(float(epsilon))
    folder = Path(folder)
    seen = set()
    for c in shards.iter_samples(clean, split):
        seen.add(f"{c.id}.png")
        path = folder / f"{c.id}.png"
        if not path.is_file():
            report.add("missing", c.id)
            continue
        with Image.open(path) as im:
            exported = np.asarray(im.convert("RGB"))
        original = c.image()
        if exported.shape != original.shape:
            report.add("size", f"{c.id}: {exported.shape[:2]} != {original.shape[:2]}")
            continue
        linf = int(np.abs(exported.astype(np.int16) - original).max())
        report.max_linf = max(report.max_linf, linf)
        if linf > epsilon:
            report.add("linf", f"{c.id}: {linf} > {epsilon:g}")
        report.n_checked += 1
    for extra in sorted(p.name for p in folder.glob("*.png") if p.name not in seen):
        report.add("extra", extra)
    return report
