"""Host memory and wall time of ``mme poison``'s load + one round at two dataset sizes (CPU).

    OMP_NUM_THREADS=1 python scripts/scaling_bench.py --sizes 2000 20000 --root /tmp/scaling

For each size: synthetic 64 px JPEG shards (``mme.app.bench.synthetic_shards``), then, in a fresh
process, ``workstore.load_pairs`` and one MEM round (tiny settings: 2 surrogate steps, 1 PGD step
over every image, no HotFlip). Reported: wall time of each part; the peak anonymous (heap) RSS,
sampled every 50 ms; the file-backed RSS at the end (the memory-mapped store's pages, which the
kernel can drop) and the store's size on disk. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples ``RssAnon`` in a thread; ``peak`` in MB."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kb("RssAnon"))
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_kb("RssAnon")) / 1024


def measure(clean: Path, work: Path) -> dict:
    """One size, in this process: load + one round."""
    os.environ["MME_TRACKING"] = "off"
    import torch

    from mme import models
    from mme.config import PoisonConfig
    from mme.protection import resume, workstore
    from mme.protection.methods.mem import MEM
    from mme.protection.methods.triggers import candidate_mask

    sampler = PeakAnon()
    cfg = PoisonConfig(
        clean=clean, out=work / "out", private=work / "private", model="mme-tiny-vit",
        rounds=1, surrogate_steps=2, pgd_steps=1, trigger_rounds=0, batch_size=128,
        device="cpu",
    )  # fmt: skip
    torch.manual_seed(0)
    model, tok = models.create_model(cfg.model, None, torch.device("cpu"))
    size = models.image_size(model)
    store_dir = resume.work_dir(cfg)
    store_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = workstore.load_pairs(cfg, store_dir, tok, size)
    t_load = time.perf_counter() - t0
    allowed = candidate_mask(tok, model.token_embedding.num_embeddings)
    workstore.init_state(store, cfg, allowed)
    mem = MEM(model, store, cfg, torch.device("cpu"), allowed)
    t0 = time.perf_counter()
    mem.run_round(0)
    t_round = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in store_dir.iterdir())
    return {
        "n": store.n,
        "load_s": round(t_load, 1),
        "round_s": round(t_round, 1),
        "peak_anon_mb": round(sampler.stop(), 0),
        "file_rss_mb": round(status_kb("RssFile") / 1024, 0),
        "store_mb": round(disk / 2**20, 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/mme-scaling"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one size
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.root)))
        return
    from mme.app.bench import synthetic_shards

    rows = []
    for n in args.sizes:
        clean = args.root / f"clean-{n}"
        if not (clean / "manifest.json").exists():
            synthetic_shards(clean, n, 64)
        work = args.root / f"w{n}"
        cmd = [sys.executable, __file__, "--measure", str(clean), "--root", str(work)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
