"""``mme poison``: protect the train split of a clean shard folder (MEM or a baseline).

Output folder (``cfg.out``): protected ``train-*.tar`` shards with the clean ids (image =
clip(x + δ) as PNG at the working resolution, captions = trigger words + caption, metadata);
``noise.npy`` (int8 pixel units, row order = ``triggers.json["ids"]``); ``triggers.json``;
``grid.png`` (clean | noise amplified | protected); ``manifest.json`` (written last). Work files
(memory-mapped pixels and noise, per-round checkpoints) live in ``<out>.work/`` until success, so
``--resume`` continues a killed run; the input shards are never modified.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mme import __version__, imageops, models, shards
from mme.attacks.mem import MEM, RoundHook
from mme.attacks.store import PairStore
from mme.attacks.triggers import candidate_mask, protected_caption, trigger_text
from mme.config import ConfigError, PoisonConfig, add_section_arguments, section_from_args

CKPT = "checkpoint.pt"
TIMING_KEYS = ("round_seconds",)  # per-round stats that vary run to run: MLflow only


def work_dir(cfg: PoisonConfig) -> Path:
    return Path(f"{cfg.out}.work")


def check_inputs(cfg: PoisonConfig) -> dict[str, Any]:
    """Fail before any work on a bad model name or a missing/empty clean dataset."""
    try:
        models.check_model_name(cfg.model)
    except ValueError as err:
        raise ConfigError(f"poison.model = {cfg.model!r}: {err}") from None
    try:
        manifest = shards.load_manifest(cfg.clean)
    except FileNotFoundError as err:
        raise ConfigError(f"poison.clean = {str(cfg.clean)!r}: {err}") from None
    if manifest.get("splits", {}).get("train", {}).get("images", 0) == 0:
        raise ConfigError(f"poison.clean = {str(cfg.clean)!r}: the train split has no images")
    if Path(cfg.out).resolve() == Path(cfg.clean).resolve():
        raise ConfigError("poison.out must differ from poison.clean (inputs are never modified)")
    return manifest


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the body with exactly ``n`` torch intra-op threads, whatever the machine offers.

    Why: CPU kernels split their reductions by thread count (e.g. LayerNorm's weight/bias
    gradients are summed in one partial per thread), so the surrogate's weights, and through
    them every PGD sign and HotFlip choice, drift with ``OMP_NUM_THREADS`` or the core count.
    A fixed count gives the same partition, hence the same bytes, on any machine with the same
    CPU instruction set (docs/orchestration.md, "Reproducibility"). ``n`` above the core count
    only time-shares; ``poison.threads`` is part of the result like ``seed``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def config_hash(cfg: PoisonConfig) -> str:
    """Hash of what determines the result (a resumed run must match it)."""
    keep = cfg.model_dump(mode="json", exclude={"device", "compile", "grid_samples", "shard_size"})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def load_pairs(
    cfg: PoisonConfig, work: Path, tokenizer: Any, size: int
) -> tuple[PairStore, list[str], list[list[str]], list[str]]:
    """Stream the clean train split into the memmapped store; returns (store, ids, captions)."""
    n = shards.load_manifest(cfg.clean)["splits"]["train"]["images"]
    clean, noise = PairStore.open_arrays(work, n, size, imageops.noise_dtype(cfg.epsilon))
    ids, captions, source_sha = [], [], []
    it = shards.iter_samples(cfg.clean, "train")
    for i, s in enumerate(tqdm(it, total=n, desc="load", unit="img", file=sys.stderr)):
        clean[i] = imageops.to_working_resolution(s.image_bytes, size)
        ids.append(s.id)
        captions.append(s.captions)
        source_sha.append(s.meta.get("sha256", shards.sha256_bytes(s.image_bytes)))
    if len(ids) != n:
        raise ConfigError(f"{cfg.clean}: manifest lists {n} train images, shards hold {len(ids)}")
    counts = torch.tensor([len(c) for c in captions])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    tokens = tokenizer([c for caps in captions for c in caps])
    store = PairStore(
        clean=clean,
        noise=noise,
        current=0,
        cap_tokens=tokens,
        cap_offsets=offsets,
        triggers=torch.zeros(n, cfg.trigger_len, dtype=torch.long),
        protect=torch.ones(n, dtype=torch.bool),
        eot_id=tokenizer.eot_token_id,
    )
    return store, ids, captions, source_sha


def init_state(store: PairStore, cfg: PoisonConfig, allowed: torch.Tensor) -> None:
    """Fresh start: zero noise, random allowed triggers, the protected subset (all by seed)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for buf in store.noise:
        buf[:] = 0
    pool = torch.nonzero(allowed).flatten()
    store.triggers = pool[torch.randint(len(pool), store.triggers.shape, generator=gen)]
    n_protect = max(1, round(cfg.protect_fraction * store.n))
    chosen = torch.randperm(store.n, generator=gen)[:n_protect]
    store.protect = torch.zeros(store.n, dtype=torch.bool)
    store.protect[chosen] = True
    if cfg.method == "random":  # uniform integer noise in [-ε, ε], then kept inside [0, 255]
        e = int(cfg.epsilon)
        for rows in torch.nonzero(store.protect).flatten().split(1024):
            r = rows.numpy()
            d = torch.randint(-e, e + 1, (len(r), *store.clean.shape[1:]), generator=gen)
            px = torch.from_numpy(store.clean[r].astype(np.int16))
            store.noise[0][r] = ((px + d).clamp(0, 255) - px).numpy()


def save_checkpoint(work: Path, mem: MEM, store: PairStore, r: int, cfg: PoisonConfig) -> None:
    ckpt = {
        "round": r,
        "config_hash": config_hash(cfg),
        "current": store.current,
        "triggers": store.triggers,
        "protect": store.protect,
        "mem": mem.state(),
        "stats": mem.history,
    }
    tmp = work / f".{CKPT}.partial"
    torch.save(ckpt, tmp)
    os.replace(tmp, work / CKPT)


def resume_from(work: Path, mem: MEM, store: PairStore, cfg: PoisonConfig) -> int:
    """Restore the last finished round; returns the round to start with."""
    path = work / CKPT
    if not path.exists():
        print(f"mme poison: --resume: no checkpoint in {work}, starting fresh", file=sys.stderr)
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["config_hash"] != config_hash(cfg):
        raise ConfigError(f"--resume: {path} was made with other settings; remove it or match them")
    store.current, store.triggers, store.protect = (
        ckpt["current"],
        ckpt["triggers"],
        ckpt["protect"],
    )
    mem.load_state(ckpt["mem"])
    mem.history = ckpt["stats"]
    return ckpt["round"] + 1


def run_rounds(
    mem: MEM,
    store: PairStore,
    cfg: PoisonConfig,
    start: int,
    on_round: RoundHook | None,
    work: Path,
) -> None:
    from mme import tracking

    rounds = range(start, cfg.rounds) if cfg.method != "random" else range(0)
    for r in tqdm(rounds, desc=f"{cfg.method} rounds", unit="round", file=sys.stderr):
        stats = mem.run_round(r)
        mem.history.append({"round": r, **stats})
        tracking.log_metrics(stats, step=r)
        save_checkpoint(work, mem, store, r, cfg)
        tqdm.write(f"round {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if on_round is not None:
            on_round(r, stats)


def write_outputs(
    cfg: PoisonConfig,
    store: PairStore,
    ids: list[str],
    captions: list[list[str]],
    source_sha: list[str],
    tokenizer: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Protected shards, raw artifacts and the picture grid; returns the shard records."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    noise = store.noise[store.current]
    texts = [trigger_text(tokenizer, t.tolist()) for t in store.triggers]
    writer = shards.ShardWriter(out, "train", cfg.shard_size)
    for i in tqdm(range(store.n), desc="write", unit="img", file=sys.stderr):
        prot = bool(store.protect[i])
        trig = texts[i] if prot and cfg.method == "mem" else ""
        png = shards.encode_png(imageops.apply_noise(store.clean[i], noise[i]).transpose(1, 2, 0))
        size = store.clean.shape[-1]
        meta = {
            "id": ids[i],
            "source": str(cfg.clean),
            "sha256": shards.sha256_bytes(png),
            "width": size,
            "height": size,
            "method": cfg.method,
            "epsilon": cfg.epsilon,
            "protected": prot,
            "trigger_text": trig,
            "trigger_ids": store.triggers[i].tolist() if trig else [],
            "clean_sha256": source_sha[i],
        }
        caps = [protected_caption(trig, c) for c in captions[i]]
        writer.write(shards.Sample(ids[i], png, "png", caps, meta))
    records = writer.close()
    tmp = out / ".noise.npy.partial"
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(noise))
    os.replace(tmp, out / "noise.npy")
    trig_json = {
        "ids": ids,
        "protected": store.protect.tolist(),
        "trigger_ids": store.triggers.tolist() if cfg.method == "mem" else [],
        "trigger_text": texts if cfg.method == "mem" else [],
    }
    shards.write_json_atomic(out / "triggers.json", trig_json)
    write_grid(cfg, store, captions, texts, noise)
    return records, writer.n_captions


def write_grid(
    cfg: PoisonConfig,
    store: PairStore,
    captions: list[list[str]],
    texts: list[str],
    noise: np.ndarray,
) -> Path:
    from mme import grid

    rows = torch.nonzero(store.protect).flatten()[: cfg.grid_samples].numpy()
    clean = np.asarray(store.clean[rows])
    prot = imageops.apply_noise(clean, np.asarray(noise[rows]))
    caps = [
        protected_caption(texts[r] if cfg.method == "mem" else "", captions[r][0]) for r in rows
    ]
    path = Path(cfg.out) / "grid.png"
    title = f"{cfg.method}, eps={cfg.epsilon:g}/255"
    grid.save_grid(path, clean, prot, caps, cfg.epsilon, title=title)
    return path


def poison(cfg: PoisonConfig, resume: bool = False, on_round: RoundHook | None = None) -> dict:
    """Protect ``cfg.clean``'s train split into ``cfg.out``; returns the output manifest."""
    from mme import tracking

    clean_manifest = check_inputs(cfg)
    t0 = time.perf_counter()
    work = work_dir(cfg)
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # surrogate init: same seed, same model
    device = models.resolve_device(cfg.device)
    model, tokenizer = models.create_model(cfg.model, cfg.pretrained, device)
    size = models.image_size(model)
    store, ids, captions, source_sha = load_pairs(cfg, work, tokenizer, size)
    allowed = candidate_mask(tokenizer, model.token_embedding.num_embeddings)
    mem = MEM(model, store, cfg, device, allowed)
    start = resume_from(work, mem, store, cfg) if resume else 0
    if start == 0:
        init_state(store, cfg, allowed)
    params = poison_params(cfg)
    with tracking.start_run(tracking.experiment_name(), f"poison-{cfg.method}", params):
        with fixed_threads(cfg.threads):  # the bytes must not depend on the machine's cores
            run_rounds(mem, store, cfg, start, on_round, work)
        t_gen = time.perf_counter() - t0
        # while shards are being replaced no manifest may describe the folder
        (Path(cfg.out) / "manifest.json").unlink(missing_ok=True)
        records, n_captions = write_outputs(cfg, store, ids, captions, source_sha, tokenizer)
        manifest = output_manifest(cfg, clean_manifest, store, records, n_captions, mem)
        shards.write_json_atomic(Path(cfg.out) / "manifest.json", manifest)
        manifest["verify"] = verify_outputs(cfg)
        shards.write_json_atomic(Path(cfg.out) / "manifest.json", manifest)
        seconds = {"seconds_generation": t_gen, "seconds_total": time.perf_counter() - t0}
        log_outputs(cfg, manifest, seconds)
    shutil.rmtree(work)
    print(
        f"mme poison: {cfg.out}: {manifest['n_protected']} of {store.n} images protected"
        f" ({cfg.method}, eps {cfg.epsilon:g}/255) in {seconds['seconds_total']:.0f} s",
        file=sys.stderr,
    )
    return manifest


def poison_params(cfg: PoisonConfig) -> dict[str, Any]:
    """MLflow params, with the project-wide names (``method``, ``epsilon``, ``trigger_len``,
    ``data_manifest_sha256``: the clean input's version, as its victim's train run logs it)."""
    return {
        "stage": "poison",
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "step_size": cfg.step_size,
        "pgd_steps": cfg.pgd_steps,
        "rounds": cfg.rounds,
        "surrogate_steps": cfg.surrogate_steps,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        "trigger_rounds": cfg.trigger_rounds,
        "candidates": cfg.candidates,
        "surrogate_model": cfg.model,
        "batch_size": cfg.batch_size,
        "protect_fraction": cfg.protect_fraction,
        "threads": cfg.threads,
        "data_manifest_sha256": shards.manifest_sha256(cfg.clean),
    }


def output_manifest(
    cfg: PoisonConfig,
    clean_manifest: dict[str, Any],
    store: PairStore,
    records: list[dict[str, Any]],
    n_captions: int,
    mem: MEM,
) -> dict[str, Any]:
    """The protected set's description. Only what the data depends on: no wall times, so the
    same inputs give the same bytes, hence the same dataset version (its sha256: what
    ``mme report`` and ``reevaluate`` key results on) and the same DVC hash downstream."""
    first = [t for t, p in zip(store.triggers.tolist(), store.protect.tolist(), strict=True) if p]
    return {
        "created_by": "mme poison",
        "version": __version__,
        # top level, read by mme train/evaluate to describe the data they ran on
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "trigger_len": cfg.trigger_len if cfg.method == "mem" else 0,
        "config": cfg.model_dump(mode="json"),
        "clean": str(cfg.clean),
        "clean_splits": {k: v["images"] for k, v in clean_manifest["splits"].items()},
        "working_size": int(store.clean.shape[-1]),
        "n_protected": int(store.protect.sum()),
        "distinct_triggers": len({tuple(t) for t in first}) if cfg.method == "mem" else 0,
        "splits": {"train": {"images": store.n, "captions": n_captions, "shards": records}},
        "rounds": [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in mem.history],
    }


def verify_outputs(cfg: PoisonConfig) -> dict[str, Any]:
    """Run ``mme verify`` on the fresh output; a violation here is a bug, so it stops the run."""
    from mme.verify import verify

    report = verify(cfg.clean, cfg.out)
    if not report.ok:
        raise RuntimeError(f"protected set failed verification:\n{report.table()}")
    d = report.to_dict()
    return {k: d[k] for k in ("ok", "max_linf", "n_checked", "n_with_noise", "psnr", "ssim")}


def log_outputs(cfg: PoisonConfig, manifest: dict, seconds: dict[str, float]) -> None:
    """Summary metrics (wall times: here and on stderr only, see :func:`output_manifest`)."""
    from mme import tracking

    summary = manifest["verify"]
    metrics = seconds | {k: manifest[k] for k in ("n_protected", "distinct_triggers")}
    metrics |= {
        "verify_max_linf": summary["max_linf"],
        "verify_ok": float(summary["ok"]),
    }
    for q in ("psnr", "ssim"):
        if summary[q]["n"] and summary[q]["mean"] != "inf":
            metrics[f"verify_{q}_mean"] = summary[q]["mean"]
    tracking.log_metrics(metrics)
    for name in ("grid.png", "manifest.json", "triggers.json"):
        tracking.log_artifact(Path(cfg.out) / name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue a killed run")
    add_section_arguments(parser, "poison")


def run(args: argparse.Namespace) -> int:
    poison(section_from_args("poison", args), resume=args.resume)
    return 0
