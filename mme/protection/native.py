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

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mme import fsio, imageops, limits, shards

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


def noise_rows(private: Path, size: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """The private folder's noise.npy (memory-mapped) and its id -> row map (row order:
    triggers.json ids); ``size``: the working size it must have (None: its own)."""
    noise_path = private / "noise.npy"
    if not noise_path.is_file():
        raise FileNotFoundError(
            f"{noise_path}: not found (--private: the poison run's private folder)"
        )
    noise = np.load(noise_path, mmap_mode="r", allow_pickle=False)
    ids = json.loads((private / "triggers.json").read_text()).get("ids")
    size = (noise.shape[-1] if noise.ndim else 0) if size is None else size
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


def take(samples: Iterator[Any], waiting: dict[str, Any], key: str) -> Any:
    """Item ``key`` from ``samples`` (anything with an ``id``), buffering in ``waiting`` only
    those that come early (the sets are normally in the same order: nothing is buffered)."""
    while key not in waiting:
        s = next(samples, None)
        if s is None:
            raise ValueError(f"sample {key} is not in the clean set")
        waiting[s.id] = s
    return waiting.pop(key)


def set_geometry(protected: Path) -> tuple[float, int]:
    """``(epsilon, working size)`` of a protected set, from its manifest."""
    manifest = shards.load_manifest(protected)
    try:
        return float(manifest["config"]["epsilon"]), int(manifest["working_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{protected}/manifest.json lacks config.epsilon or working_size"
        ) from None


def native_pixels(
    protected: Path, split: str, clean: Path, private: Path
) -> Iterator[tuple[shards.Sample, shards.Sample, np.ndarray]]:
    """``(protected sample, clean sample, protected pixels at the clean image's own size)`` for
    every sample of ``split``, streamed: one native image in memory at a time."""
    eps, size = set_geometry(Path(protected))
    delta, row = noise_rows(Path(private), size)
    originals, waiting = shards.iter_samples(clean, split), {}
    for p in shards.iter_samples(protected, split):
        if p.id not in row:
            raise ValueError(f"{protected}: sample {p.id} has no row in noise.npy")
        c = take(originals, waiting, p.id)
        yield p, c, protect_native(c.image(), delta[row[p.id]], eps)


def native_samples(
    protected: Path, split: str, clean: Path | None = None, private: Path | None = None
) -> Iterator[shards.Sample]:
    """The protected samples of ``split`` with each image replaced by a PNG of the clean original
    at its native size plus δ_native (captions and metadata from the protected set). Streams:
    one native image in memory at a time."""
    protected = Path(protected)
    set_geometry(protected)  # a manifest without them fails before the private folder is read
    if private is None:  # the public manifest does not say where the private folder is
        raise ValueError("native export needs the run's private folder (--private DIR)")
    manifest = shards.load_manifest(protected)
    clean = Path(clean) if clean is not None else _recorded_clean(Path(private), manifest)
    for p, _, pixels in native_pixels(protected, split, clean, Path(private)):
        png = shards.encode_png(pixels)
        meta = dict(p.meta, sha256=shards.sha256_bytes(png), native=True)
        meta["height"], meta["width"] = pixels.shape[:2]
        yield shards.Sample(p.id, png, "png", p.captions, meta)


# A lossy file (JPEG) cannot hold δ to the pixel: it must keep at least this share of it
# (projection of published - clean on δ). At mme protect's q 98, 4:4:4 every photo measured kept
# >= 0.95 (an RN50 MEM δ on 20 Flickr8k photos) and >= 1.00 (random ±8 on 50); at q 90 4:2:0
# 0.45 and 0.26: docs/protect.md, scripts/jpeg_survival.py.
KEPT_MIN = 0.8
LOSSY_FORMATS = ("JPEG", "MPO")


@dataclass
class NativeReport:
    """Outcome of :func:`verify_native`: ok when every clean image has a published image of the
    same size whose change is bounded (lossless: L∞ ≤ ε, and with the private noise exactly
    clean + δ_native; lossy: mean |change| ≤ ε, and with the noise at least :data:`KEPT_MIN`
    of δ kept), and the folder has no other images."""

    epsilon: float
    n_checked: int = 0
    max_linf: int = 0
    kept_min: float | None = None  # least share of δ a lossy file kept (with the private noise)
    formats: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.n_checked > 0 and not self.problems

    def add(self, kind: str, detail: str) -> None:
        self.problems.setdefault(kind, []).append(detail)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "epsilon": self.epsilon, "n_checked": self.n_checked,
                "max_linf": self.max_linf, "kept_min": self.kept_min, "formats": self.formats,
                "problems": self.problems}  # fmt: skip


def published_files(folder: Path, split: str = "train") -> dict[str, Path]:
    """``{id: file}`` of a published folder: from its ``metadata.jsonl`` (``id`` and
    ``file_name`` of every record of ``split``, each resolved under ``folder``), else
    ``<id>.png`` for every PNG in it (an export made before the index existed)."""
    folder = Path(folder)
    index = folder / "metadata.jsonl"
    if not index.is_file():
        return {p.stem: p for p in folder.glob("*.png")}
    files: dict[str, Path] = {}
    with open(index, encoding="utf-8") as f:
        for n, line in enumerate(iter(lambda: f.readline(limits.MAX_METADATA_LINE), ""), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, name = rec["id"], rec["file_name"]
                if not (isinstance(key, str) and isinstance(name, str)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{index}, line {n}: not a record with id and file_name") from None
            if rec.get("split", split) == split:
                files[key] = fsio.resolve_under(folder, name)
    return files


def verify_native(
    clean: Path, folder: Path, epsilon: float, split: str = "train", private: Path | None = None
) -> NativeReport:
    """Check a published folder (``mme protect``, ``mme export --native``) against the clean
    originals at their own size (see :class:`NativeReport`); ``private``: the poison run's
    private folder (noise.npy, triggers.json) for the exact / kept-share checks."""
    report = NativeReport(float(epsilon))
    folder = Path(folder)
    files = published_files(folder, split)
    delta = noise_rows(Path(private)) if private is not None else None
    expected = set()
    for c in shards.iter_samples(clean, split):
        path = files.get(c.id)
        if path is None or not path.is_file():
            report.add("missing", c.id)
            continue
        expected.add(path.resolve())
        noise = delta[0][delta[1][c.id]] if delta is not None and c.id in delta[1] else None
        _check_file(report, c, path, noise)
    images = (p for p in folder.rglob("*") if p.suffix.lower() in imageops.IMAGE_SUFFIXES)
    for extra in sorted(p.relative_to(folder).as_posix() for p in images):
        if (folder / extra).resolve() not in expected:
            report.add("extra", extra)
    return report


def _check_file(report: NativeReport, c: shards.Sample, path: Path, noise: Any) -> None:
    """One published file against its clean original (and its δ, when given)."""
    try:
        with Image.open(io.BytesIO(fsio.read_regular(path, limits.MAX_FILE_BYTES))) as im:
            fmt, published = str(im.format), np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # a link, junk, a bomb
        report.add("unreadable", f"{c.id}: {err}")
        return
    report.formats[fmt] = report.formats.get(fmt, 0) + 1
    original = c.image()
    if published.shape != original.shape:
        report.add("size", f"{c.id}: {published.shape[:2]} != {original.shape[:2]}")
        return
    change = published.astype(np.int16) - original
    linf = int(np.abs(change).max())
    report.max_linf = max(report.max_linf, linf)
    report.n_checked += 1
    ref = None
    if noise is not None:
        ref = protect_native(original, noise, report.epsilon).astype(np.int16) - original
    if fmt not in LOSSY_FORMATS:
        if linf > report.epsilon:
            report.add("linf", f"{c.id}: {linf} > {report.epsilon:g}")
        elif ref is not None and not np.array_equal(change, ref):
            report.add("noise", f"{c.id}: not clean + the run's noise")
    elif ref is None or not ref.any():
        mean = float(np.abs(change).mean())
        if mean > report.epsilon:
            report.add("linf", f"{c.id}: mean change {mean:.1f} > {report.epsilon:g}")
    else:
        r = ref.astype(np.float64).ravel()
        kept = float(change.astype(np.float64).ravel() @ r / (r @ r))
        report.kept_min = kept if report.kept_min is None else min(report.kept_min, kept)
        if kept < KEPT_MIN:
            report.add("kept", f"{c.id}: {fmt} kept {kept:.0%} of the noise < {KEPT_MIN:.0%}")
