"""Compare two `mme poison` runs (the multi-GPU part of scripts/gpu_check.sh, issue 21).

    compare_runs.py losses A B [--tolerance T]   # per-round losses: largest relative difference
    compare_runs.py bytes A B                    # shards, noise, triggers: byte for byte

A and B are run folders holding ``out/`` (manifest.json, train-*.tar) and ``private/``. Prints
one Markdown table row; exits 1 when the losses differ by more than T or the bytes differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

KEYS = ("surrogate_loss", "trigger_loss", "pgd_loss", "mean_abs_noise_px")
PRIVATE = ("noise.npy", "triggers.json")


def rounds(run: Path) -> list[dict]:
    return json.loads((run / "out" / "manifest.json").read_text())["rounds"]


def loss_differences(a: Path, b: Path) -> dict[str, float]:
    """Largest relative difference per loss over the rounds (inf: the rounds do not match)."""
    ra, rb = rounds(a), rounds(b)
    if len(ra) != len(rb):
        return {key: float("inf") for key in KEYS}
    out: dict[str, float] = {}
    for x, y in zip(ra, rb, strict=True):
        for key in KEYS:
            if key in x or key in y:
                if key not in x or key not in y:
                    out[key] = float("inf")
                    continue
                rel = abs(x[key] - y[key]) / max(abs(y[key]), 1e-12)
                out[key] = max(out.get(key, 0.0), rel)
    return out


def digests(run: Path) -> dict[str, str]:
    files = sorted((run / "out").glob("train-*.tar")) + [run / "private" / n for n in PRIVATE]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["losses", "bytes"])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if args.mode == "losses":
        diffs = loss_differences(args.a, args.b)
        worst = max(diffs.values(), default=0.0)
        ok = worst <= args.tolerance
        detail = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        print(f"| {args.a.name} vs {args.b.name} | losses | {detail} | {worst:.2e} "
              f"{'<=' if ok else '>'} {args.tolerance:g} | {'ok' if ok else 'FAIL'} |")  # fmt: skip
    else:
        da, db = digests(args.a), digests(args.b)
        differ = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
        ok = not differ
        print(f"| {args.a.name} vs {args.b.name} | bytes | differ: {differ or 'none'} | - "
              f"| {'ok' if ok else 'FAIL'} |")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
