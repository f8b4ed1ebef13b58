"""Repack a Flickr8k-format folder (captions.csv + images/) at a smaller size for the GPU machine.

The device machine only gets the repository (64 MiB at most, ../shared stays behind), so the GPU
check carries both splits re-encoded as SIDE x SIDE JPEGs in an ignored folder. Same layout and
CSV (paths relative to the folder), so `mme prepare --source csv` reads it like the original.

    python scripts/repack_flickr8k.py SRC DST [--side 96] [--quality 90] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image


def repack(src: Path, dst: Path, side: int, quality: int, limit: int | None) -> int:
    """Write ``dst/captions.csv`` and ``dst/<images path>``; returns the number of photos."""
    with open(src / "captions.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    keep = list(dict.fromkeys(r["images"] for r in rows))[:limit]
    for rel in keep:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{src}/captions.csv: image path {rel!r} leaves the folder")
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src / rel) as im:
            small = im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            small.save(out, format="JPEG", quality=quality)
    wanted = set(keep)
    with open(dst / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if r["images"] in wanted)
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--limit", type=int, default=None, help="first N photos only")
    a = parser.parse_args()
    n = repack(a.src, a.dst, a.side, a.quality, a.limit)
    print(f"repack: {n} photos from {a.src} -> {a.dst} at {a.side} px")


if __name__ == "__main__":
    main()
