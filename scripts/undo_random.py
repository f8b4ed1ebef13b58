"""Fraction of clean pixels a data user gets back from a published `random` baseline alone,
by redrawing its noise the way the code before issue 20 drew it (torch seed + 1, default 0).

    MME_TRACKING=off python scripts/undo_random.py   (docs/threat-model.md; ~30 s on 2 cores)
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

from mme import shards
from mme.config import DataConfig, PoisonConfig
from mme.imageops import to_working_resolution
from mme.ingest.prepare import prepare
from mme.protection.poison import poison

root = Path(tempfile.mkdtemp())
prepare(DataConfig(source="synthetic", out=root / "clean", n_train=200, n_test=10, image_size=64))
cfg = PoisonConfig(
    clean=root / "clean",
    out=root / "pub",
    private=root / "priv",
    method="random",
    model="mme-tiny-vit",
    rounds=1,
    device="cpu",
    grid_samples=2,
    cpu_isa="native",
)
poison(cfg)
prot = np.stack([s.image().transpose(2, 0, 1) for s in shards.iter_samples(cfg.out, "train")])
size = prot.shape[-1]
clean = np.stack(
    [to_working_resolution(s.image_bytes, size) for s in shards.iter_samples(cfg.clean, "train")]
)
n, e = len(prot), int(cfg.epsilon)
gen = torch.Generator().manual_seed(0 + 1)  # the default seed, public
torch.randint(10, (n, cfg.trigger_len), generator=gen)  # the triggers' draw
torch.randperm(n, generator=gen)  # the protected subset's draw
d = torch.randint(-e, e + 1, prot.shape, generator=gen).numpy()
guess = np.clip(prot.astype(np.int16) - d, 0, 255)
print(f"clean pixels given back exactly: {100 * (guess == clean).mean():.2f} %")
