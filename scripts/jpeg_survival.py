"""How much of the protective noise survives publishing a photo as JPEG (issue 19, item 1).

For each of the first N photos of a caption CSV (``--resize WxH``: re-saved at that size as a
JPEG first, like a camera photo): δ = uniform integer noise in [-ε, ε] at the
working size S (the worst case for JPEG: independent per pixel), mapped onto the photo at its own
size exactly as ``mme protect`` does (:func:`mme.protection.native.protect_native`), then saved as
JPEG at each quality q (and chroma subsampling 4:2:0 / 4:4:4). Reported per setting, as means over
the photos:

- ``kept_native``: the share of δ left in ``decoded - clean`` at native size (projection
  coefficient <decoded - clean, δ> / <δ, δ>; 1 = all of it, 0 = none);
- ``kept_working``: the same after the victim's resize to S (what CLIP trains on), against the
  lossless (PNG) reference;
- ``linf`` (max) and ``psnr`` of the decoded JPEG against the clean photo;
- ``bytes``: file size relative to the original JPEG file (and the lossless PNG for comparison).

``--noise PRIVATE`` (an ``mme protect`` run's private area) takes the run's own δ and clean photos
instead of random noise and the CSV's photos.

Usage: ``python scripts/jpeg_survival.py ../shared/data/flickr8k-dev/captions.csv --n 50``
or ``python scripts/jpeg_survival.py --noise pub.private``
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from mme import imageops, shards
from mme.protection import native
from mme.protection.native import protect_native


def encode(pixels: np.ndarray, quality: int | None, subsampling: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(pixels)
    if quality is None:
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def kept(effect: np.ndarray, reference: np.ndarray) -> float:
    ref = reference.astype(np.float64).ravel()
    return float(effect.astype(np.float64).ravel() @ ref / (ref @ ref))


def photo_paths(csv_path: Path, n: int) -> list[Path]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        cells = list(dict.fromkeys(row["images"] for row in csv.DictReader(f)))
    return [csv_path.parent / c for c in cells[:n]]


def run_photos(private: Path) -> list[tuple[bytes, np.ndarray]]:
    """``(clean image bytes, δ)`` of every photo of an ``mme protect`` run."""
    noise, rows = native.noise_rows(private / "noise")
    return [(c.image_bytes, np.asarray(noise[rows[c.id]]))
            for c in shards.iter_samples(private / "clean", "train")]  # fmt: skip


def measure(original: bytes, delta: np.ndarray, settings: list, eps: int) -> dict:
    clean = decode(original)
    size = delta.shape[-1]
    prot = protect_native(clean, delta, eps)
    d_native = prot.astype(np.int16) - clean
    lossless = encode(prot, None, 0)
    clean_w = imageops.to_working_resolution(shards.encode_png(clean), size).astype(np.int16)
    ref_w = imageops.to_working_resolution(lossless, size) - clean_w
    out = {"png_bytes": len(lossless) / len(original)}
    for q, sub in settings:
        data = encode(prot, q, sub)
        dec = decode(data)
        eff = dec.astype(np.int16) - clean
        eff_w = imageops.to_working_resolution(data, size) - clean_w
        out[(q, sub)] = {
            "kept_native": kept(eff, d_native),
            "kept_working": kept(eff_w, ref_w),
            "linf": int(np.abs(eff).max()),
            "psnr": imageops.psnr(clean, dec),
            "bytes": len(data) / len(original),
        }
    return out


def csv_photos(args: argparse.Namespace) -> list[tuple[bytes, np.ndarray]]:
    """``(source bytes, random δ)`` of the CSV's first photos (``--resize``: re-saved first)."""
    resize = tuple(int(v) for v in args.resize.split("x")) if args.resize else None
    out = []
    for i, path in enumerate(photo_paths(args.csv, args.n)):
        original = path.read_bytes()
        if resize is not None:  # a larger "camera" photo: the source re-saved at q 90
            with Image.open(path) as im:
                big = im.convert("RGB").resize(resize, Image.BICUBIC)
                original = encode(np.asarray(big), 90, 2)
        rng = np.random.default_rng(i)
        size, eps = args.size, args.epsilon
        out.append((original, rng.integers(-eps, eps + 1, (3, size, size)).astype(np.int8)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, nargs="?")
    ap.add_argument("--noise", type=Path, default=None, help="a run's private area: its δ")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--size", type=int, default=224, help="working size S of δ")
    ap.add_argument("--epsilon", type=int, default=8)
    ap.add_argument("--qualities", default="85,90,95,98")
    ap.add_argument("--resize", default=None, help="WxH: re-save each photo at this size first")
    args = ap.parse_args()
    qs = [int(q) for q in args.qualities.split(",")]
    settings = [(q, sub) for q in qs for sub in (2, 0)]  # Pillow: 2 = 4:2:0, 0 = 4:4:4
    photos = run_photos(args.noise) if args.noise else csv_photos(args)
    rows = [measure(data, delta, settings, args.epsilon) for data, delta in photos]
    if args.noise:
        mean = np.mean([np.abs(d).mean() for _, d in photos])
        print(f"{len(rows)} photos of {args.noise}, the run's δ (mean |δ| {mean:.2f} px)")
    else:
        where = f"re-saved at {args.resize}" if args.resize else "as they are"
        print(f"{len(rows)} photos {where}; random δ in ±{args.epsilon} at {args.size} px")
    print(f"lossless PNG: {np.mean([r['png_bytes'] for r in rows]):.2f}x the original JPEG bytes")
    print("| q | chroma | kept (native) | kept (at S), min | max L-inf | PSNR dB | bytes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for q, sub in settings:
        m = {k: [r[(q, sub)][k] for r in rows] for k in rows[0][(q, sub)]}
        chroma = {2: "4:2:0", 0: "4:4:4"}[sub]
        kept = np.mean(m["kept_working"])
        print(
            f"| {q} | {chroma} | {np.mean(m['kept_native']):.2f} | {kept:.2f}, "
            f"{min(m['kept_working']):.2f}"
            f" | {max(m['linf'])} | {np.mean(m['psnr']):.1f} | {np.mean(m['bytes']):.2f}x |"
        )


if __name__ == "__main__":
    main()
