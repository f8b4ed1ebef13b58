"""What ``mme poison`` writes after the last round: the public shards and manifest, the private
files (noise, triggers, grid), and the one verification of the written set.

Public and private stay apart (docs/threat-model.md): nothing public says which words are the
trigger, where they sit, or which images carry noise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mme import __version__, fsio, imageops, shards
from mme.config import KEYED_FIELDS, PoisonConfig
from mme.manifest import Manifest
from mme.protection.methods.loop import Loop
from mme.protection.methods.store import PairStore
from mme.protection.methods.triggers import protected_caption, trigger_text
from mme.protection.pools import protected_pngs
from mme.protection.resume import LATER_DEFAULTS, at_later_defaults
from mme.protection.workstore import random_places

# gets the VerifyReport of the written set (mme.protection.verify_report)
VerifiedHook = Callable[[Any], None]


# per-round stats that vary run to run, the wall times of the round and of each step
# (loop.timed names them "<step>_seconds"): MLflow only, never in the manifest's bytes
TIMING_SUFFIX = "_seconds"


PRIVATE_FILES = ("noise.npy", "triggers.json", "grid.png")


def result_excluded(has_trigger: bool, cfg: PoisonConfig | None = None) -> set[str]:
    """Config keys the output manifest leaves out (see :func:`output_manifest`)."""
    # work, nproc: where the store lives and how many processes ran do not change the bytes
    # seed: with it, the protected subset and the trigger positions can be recomputed
    # clean, out, private: local paths (the public manifest names none, docs/threat-model.md)
    # noise_seed: the random baseline's noise would be regenerated from it
    keys = {"clean", "out", "private", "write_workers", "work", "nproc", "seed", "noise_seed"}
    keys |= at_later_defaults(cfg) if cfg is not None else {*LATER_DEFAULTS, *KEYED_FIELDS}
    return keys | (set() if has_trigger else {"trigger_len", *LATER_DEFAULTS})


def write_outputs(
    cfg: PoisonConfig, store: PairStore, tokenizer: Any
) -> tuple[list[dict[str, Any]], int]:
    """Protected shards, raw artifacts and the picture grid; returns the shard records.

    Ids, captions and source hashes are streamed again from the clean shards (same order as
    :func:`load_pairs`) rather than kept in memory for the whole run."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    noise = store.noise[store.current]
    texts = [trigger_text(tokenizer, t.tolist()) for t in store.triggers]
    writer = shards.ShardWriter(out, "train", cfg.shard_size)
    pngs = protected_pngs(store.clean, noise, workers=cfg.write_workers)
    grid_rows = set(grid_indices(cfg, store).tolist())
    ids, grid_caps = [], {}
    rows = tqdm(range(store.n), desc="write", unit="img", file=sys.stderr)
    for i, s in zip(rows, shards.iter_samples(cfg.clean, "train"), strict=True):
        prot = bool(store.protect[i])
        trig = texts[i] if prot and cfg.method == "mem" else ""
        word = trigger_word(store, i) if trig else 0
        png = next(pngs)
        size = store.clean.shape[-1]
        meta = {
            "id": s.id,
            "source": Path(cfg.clean).name,  # a name, not a local path: public, any folder
            "sha256": shards.sha256_bytes(png),
            "width": size,
            "height": size,
            "method": cfg.method,
            "epsilon": cfg.epsilon,
        }  # public: nothing that says which words are the trigger or which images carry noise
        caps = [protected_caption(trig, c, word) for c in s.captions]
        writer.write(shards.Sample(s.id, png, "png", caps, meta))
        ids.append(s.id)
        if i in grid_rows:
            grid_caps[i] = s.captions[0]
    records = writer.close()
    private = Path(cfg.private)
    with fsio.atomic_open(private / "noise.npy") as f:
        np.save(f, np.asarray(noise))
    trig_json = {
        "ids": ids,
        "protected": store.protect.tolist(),
        "trigger_ids": store.triggers.tolist() if cfg.method == "mem" else [],
        "trigger_text": texts if cfg.method == "mem" else [],
        "seed": cfg.seed,  # left out of the public manifest (see result_excluded)
        # what mme verify checks against: the set under test cannot vouch for its own bounds
        "epsilon": cfg.epsilon,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        "clean": str(cfg.clean),  # where the originals are: a local path, private
        **({"noise_seed": cfg.noise_seed} if cfg.method == "random" else {}),
    }
    if cfg.method == "mem" and store.trigger_word is not None:
        trig_json["trigger_word"] = store.trigger_word.tolist()  # word position in each caption
    fsio.write_json(private / "triggers.json", trig_json)
    write_grid(cfg, store, grid_caps, texts, noise)
    return records, writer.n_captions


def trigger_word(store: PairStore, i: int) -> int:
    """The word position of image ``i``'s trigger in its captions (0: first)."""
    return 0 if store.trigger_word is None else int(store.trigger_word[i])


def grid_indices(cfg: PoisonConfig, store: PairStore) -> torch.Tensor:
    """Rows shown in ``grid.png``: the first protected images."""
    return torch.nonzero(store.protect).flatten()[: cfg.grid_samples]


def write_grid(
    cfg: PoisonConfig,
    store: PairStore,
    first_captions: dict[int, str],
    texts: list[str],
    noise: np.ndarray,
) -> Path:
    from mme.protection import grid

    rows = grid_indices(cfg, store).numpy()
    clean = np.asarray(store.clean[rows])
    prot = imageops.apply_noise(clean, np.asarray(noise[rows]))
    caps = [
        protected_caption(
            texts[r] if cfg.method == "mem" else "",
            first_captions[int(r)],
            trigger_word(store, int(r)),
        )
        for r in rows
    ]
    path = Path(cfg.private) / "grid.png"
    title = f"{cfg.method}, eps={cfg.epsilon:g}/255"
    grid.save_grid(path, clean, prot, caps, cfg.epsilon, title=title)
    return path


def output_manifest(
    cfg: PoisonConfig,
    clean_manifest: Manifest,
    store: PairStore,
    records: list[dict[str, Any]],
    n_captions: int,
    mem: Loop,
) -> dict[str, Any]:
    """The protected set's description. Only what the data depends on: no wall times, so the
    same inputs give the same bytes, hence the same dataset version (its sha256: what
    ``mme report`` and ``reevaluate`` key results on) and the same DVC hash downstream."""
    first = [t for t, p in zip(store.triggers.tolist(), store.protect.tolist(), strict=True) if p]
    has_trigger = cfg.method == "mem"
    return {
        "created_by": "mme poison",
        "version": __version__,
        # top level, read by mme train/evaluate to describe the data they ran on
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        **({"trigger_position": cfg.trigger_position} if random_places(cfg) else {}),
        # no local path, no seed; write_workers: does not change the bytes; a baseline
        # has no trigger: its config must not name a second trigger_len
        "config": cfg.model_dump(mode="json", exclude=result_excluded(has_trigger, cfg)),
        # the clean set's version, not its path: whoever holds it can find and check it
        "clean_manifest_sha256": shards.manifest_sha256(cfg.clean),
        "clean_splits": {k: v.images for k, v in clean_manifest.splits.items()},
        "working_size": int(store.clean.shape[-1]),
        "n_protected": int(store.protect.sum()),
        "distinct_triggers": len({tuple(t) for t in first}) if cfg.method == "mem" else 0,
        "splits": {"train": {"images": store.n, "captions": n_captions, "shards": records}},
        "rounds": [
            {k: v for k, v in h.items() if not k.endswith(TIMING_SUFFIX)} for h in mem.history
        ],
    }


def verify_outputs(
    cfg: PoisonConfig, manifest: dict[str, Any], on_verified: VerifiedHook | None = None
) -> dict[str, Any]:
    """Run ``mme verify`` (noise and trigger checks included) on the fresh output before its
    manifest exists; a violation here is a bug, so it stops the run with no manifest written.
    ``on_verified`` gets the whole report first (``mme protect`` keeps it)."""
    from mme.protection.verify import verify

    report = verify(
        cfg.clean,
        cfg.out,
        cfg.epsilon,
        private=cfg.private,
        manifest=manifest,
        workers=cfg.write_workers,
    )
    if on_verified is not None:
        on_verified(report)
    if not report.ok:
        raise RuntimeError(f"protected set failed verification:\n{report.table()}")
    d = report.to_dict()
    return {k: d[k] for k in ("ok", "max_linf", "n_checked", "n_with_noise", "psnr", "ssim")}
