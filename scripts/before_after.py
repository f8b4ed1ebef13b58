"""The before/after picture of a finished ``mme protect`` run, cropped for a README.

Reads the published folder (``metadata.jsonl``: each photo's file) and the run's clean originals
(``PRIVATE/clean``), and draws original | protected | difference amplified from [-ε, ε] for the
first ``--n`` photos, each cropped to its central ``--crop`` pixels at its own size (no
resampling): :func:`mme.protection.grid.before_after`, the picture the run keeps in
``PRIVATE/summary/before_after.png`` uncropped.

Usage: ``python scripts/before_after.py pub pub.private docs/before_after.png --n 3 --crop 160``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from mme import shards
from mme.protection import grid, native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("published", type=Path)
    ap.add_argument("private", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--crop", type=int, default=160)
    args = ap.parse_args()
    files = native.published_files(args.published)
    eps = native.set_geometry(args.private / "protected")[0]
    rows = []
    for c in shards.iter_samples(args.private / "clean", "train"):
        with Image.open(files[c.id]) as im:
            rows.append((c.image(), np.asarray(im.convert("RGB"))))
        if len(rows) == args.n:
            break
    grid.save_before_after(args.out, rows, eps, crop=args.crop)
    print(f"{args.out}: {len(rows)} photos, central {args.crop} px, eps {eps:g}")


if __name__ == "__main__":
    main()
