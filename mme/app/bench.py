"""``mme bench``: time every phase of protection and victim training on the current device.

Each phase runs the project's own code (``MEM`` methods, ``load_pairs``, ``write_outputs`` +
``verify``, ``train_victim``) on synthetic pairs of the requested model, image size and batch
size, and is compared with the **ceiling**: the image tower's forward + backward w.r.t. the pixels
(what one PGD pair-step costs at best), ``torch.compile``'d on CUDA, eager elsewhere.

Units: surrogate steps/s, PGD pair-steps/s (images × PGD steps per second), HotFlip seconds per
batch, load / write+verify images/s, victim pairs/s (one epoch, the trainer's start-up included).
Each phase is also given as images/s (surrogate: steps/s × batch; HotFlip: batch / s a batch)
and as its share of the ceiling, a rough bound (the surrogate also runs the text tower and
parameter gradients, so it cannot reach 100 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mme import arguments
from mme.config import PHASES, BenchConfig

WORDS = "dog man girl runs on the grass with a red ball in water near two people boy".split()


def use_compile(cfg: BenchConfig, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronised on both sides."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def build_model(cfg: BenchConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    import open_clip

    from mme import models

    models.check_model_name(cfg.model)
    kwargs = {"force_image_size": cfg.image_size} if cfg.image_size else {}
    model = open_clip.create_model(cfg.model, device=device, **kwargs)
    return model.eval(), open_clip.get_tokenizer(cfg.model)


def ceiling(model: torch.nn.Module, cfg: BenchConfig, size: int, device: torch.device) -> dict:
    """Image tower fwd + bwd w.r.t. pixels, images/s (compiled on CUDA unless ``off``)."""
    cuda = device.type == "cuda"
    compiled = use_compile(cfg, device)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model.to(memory_format=fmt).requires_grad_(False)  # as MEM runs it
    fn = torch.compile(model.encode_image) if compiled else model.encode_image
    x = torch.rand(cfg.batch_size, 3, size, size, device=device).to(memory_format=fmt)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step() -> None:
        xi = x.detach().requires_grad_(True)
        with ctx:
            out = fn(xi).float().sum()
        torch.autograd.grad(out, xi)

    for _ in range(2):  # warm-up (and compilation)
        step()
    sec = timed(lambda: [step() for _ in range(cfg.steps)], device)
    note = "torch.compile" if compiled else "eager"
    return {"value": cfg.steps * cfg.batch_size / sec, "unit": "img/s", "note": note}


def synthetic_shards(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random JPEG images with 5 random captions each, written as a clean shard folder."""
    import io

    from PIL import Image

    from mme import shards

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        caps = [" ".join(rng.choice(WORDS, int(rng.integers(6, 16)))) for _ in range(5)]
        meta = {"id": f"b{i:06d}", "source": "bench", "width": size, "height": size}
        meta["sha256"] = shards.sha256_bytes(buf.getvalue())
        samples.append(shards.Sample(f"b{i:06d}", buf.getvalue(), "jpg", caps, meta))
    records = shards.write_shards(folder, "train", samples, 1000)
    manifest = {"splits": {"train": {"images": n, "shards": records}}, "created_by": "mme bench"}
    shards.write_json_atomic(folder / "manifest.json", manifest)
    return folder


@contextlib.contextmanager
def tracking_off() -> Iterator[None]:
    before = os.environ.get("MME_TRACKING")
    os.environ["MME_TRACKING"] = "off"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MME_TRACKING")
        else:
            os.environ["MME_TRACKING"] = before


def poison_phases(cfg: BenchConfig, model: Any, tok: Any, root: Path, device: torch.device) -> dict:
    """load, surrogate, PGD, HotFlip and write + verify through the real poisoning code."""
    from mme import models
    from mme.config import PoisonConfig
    from mme.protection import workstore
    from mme.protection.methods.mem import MEM
    from mme.protection.methods.triggers import candidate_mask

    size = models.image_size(model)
    n = cfg.batch_size * cfg.batches
    clean = synthetic_shards(root / "clean", n, size)
    pcfg = PoisonConfig(
        clean=clean, out=root / "protected", private=root / "private", model=cfg.model,
        batch_size=cfg.batch_size,
        pgd_steps=cfg.pgd_steps, trigger_len=cfg.trigger_len, candidates=cfg.candidates,
        device=device.type, compile=use_compile(cfg, device),
    )  # fmt: skip
    work = root / "work"
    work.mkdir()
    res: dict[str, dict[str, Any]] = {}
    store: list[Any] = []
    sec = timed(lambda: store.append(workstore.load_pairs(pcfg, work, tok, size)), device)
    res["load"] = {"value": n / sec, "unit": "img/s", "img_per_s": n / sec}
    pairs = store[0]
    allowed = candidate_mask(tok, model.token_embedding.num_embeddings)
    workstore.init_state(pairs, pcfg, allowed)
    mem = MEM(model, pairs, pcfg, device, allowed)
    want = set(cfg.phases)
    if want & {"surrogate", "pgd", "hotflip"}:
        mem.train_surrogate(1, noisy=True)  # warm-up (compilation, cudnn autotuning)
    if "surrogate" in want:
        sec = timed(lambda: mem.train_surrogate(cfg.steps, noisy=True), device)
        rate = cfg.steps / sec
        res["surrogate"] = {"value": rate, "unit": "steps/s", "img_per_s": rate * cfg.batch_size}
    if "pgd" in want:
        sec = timed(lambda: mem.update_noise(minimize=True, shuffle=True), device)
        rate = n * cfg.pgd_steps / sec
        res["pgd"] = {"value": rate, "unit": "pair-steps/s", "img_per_s": rate}
        pairs.swap()
    if "hotflip" in want:
        sec = timed(mem.update_triggers, device) / cfg.batches
        res["hotflip"] = {"value": sec, "unit": "s/batch", "img_per_s": cfg.batch_size / sec}
    if "write_verify" in want:
        args = (pcfg, pairs, tok, mem)
        sec = timed(lambda: write_and_verify(*args), device)
        res["write_verify"] = {"value": n / sec, "unit": "img/s", "img_per_s": n / sec}
    return {k: v for k, v in res.items() if k in cfg.phases}


def write_and_verify(pcfg, store, tok, mem) -> None:  # noqa: ANN001
    """What ``mme poison`` does after the last round: write the set, its manifest, verify it."""
    from mme import fsio
    from mme.manifest import read_manifest
    from mme.protection import outputs

    records, n_captions = outputs.write_outputs(pcfg, store, tok)
    clean_manifest = read_manifest(pcfg.clean)
    manifest = outputs.output_manifest(pcfg, clean_manifest, store, records, n_captions, mem)
    manifest["verify"] = outputs.verify_outputs(pcfg, manifest)  # verified, then written last
    fsio.write_json(Path(pcfg.out) / "manifest.json", manifest)


def victim_phase(cfg: BenchConfig, root: Path, device: torch.device) -> dict:
    """One open_clip_train epoch on the synthetic clean set: pairs/s (start-up included)."""
    from mme.config import VictimConfig
    from mme.victim.train import train_victim

    vcfg = VictimConfig(
        model=cfg.model, epochs=1, batch_size=cfg.batch_size, warmup=1, device=device.type
    )
    run_dir = root / "victim"
    train_victim(vcfg, root / "clean", run_dir)
    summary = json.loads((run_dir / "train.json").read_text())
    rate = summary["n_pairs"] / summary["train_wall_s"]
    return {"value": rate, "unit": "pairs/s", "img_per_s": rate, "note": "start-up included"}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure the phases of ``cfg``; returns the JSON record (also written to ``cfg.out``)."""
    from mme import models

    unknown = sorted(set(cfg.phases) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown phases {unknown} (allowed: {', '.join(PHASES)})")
    device = models.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, tok = build_model(cfg, device)
    size = models.image_size(model)
    res: dict[str, dict[str, Any]] = {}
    if "ceiling" in cfg.phases:
        res["ceiling"] = ceiling(model, cfg, size, device)
        res["ceiling"]["img_per_s"] = res["ceiling"]["value"]
    with tempfile.TemporaryDirectory(prefix="mme-bench-") as tmp, tracking_off():
        root = Path(tmp)
        if set(cfg.phases) & {"load", "surrogate", "pgd", "hotflip", "write_verify", "victim"}:
            res |= poison_phases(cfg, model, tok, root, device)
        if "victim" in cfg.phases:
            res["victim"] = victim_phase(cfg, root, device)
    top = res.get("ceiling", {}).get("img_per_s")
    for r in res.values():
        r["share_of_ceiling"] = r["img_per_s"] / top if top else None
    record = {
        "config": cfg.model_dump(mode="json"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "image_size": size,
        "torch": torch.__version__,
        "phases": {k: res[k] for k in PHASES if k in res},
    }
    if cfg.out is not None:
        from mme import shards

        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        shards.write_json_atomic(Path(cfg.out), record)
    return record


def table(record: dict[str, Any]) -> str:
    """Markdown table: phase, value, unit, images/s, share of the ceiling."""
    c = record["config"]
    lines = [
        f"mme bench: {c['model']} at {record['image_size']} px, batch {c['batch_size']}, "
        f"{record['device']} ({record['precision']}, {record['threads']} threads)",
        "",
        "| phase | value | unit | img/s | share of ceiling |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in record["phases"].items():
        share = "–" if r["share_of_ceiling"] is None else f"{100 * r['share_of_ceiling']:.0f} %"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {name}{note} | {r['value']:.4g} | {r['unit']} | {r['img_per_s']:.4g} | {share} |"
        )
    return "\n".join(lines)


add_arguments = arguments.bench  # flags live where --help needs no torch


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mme.config import ConfigError

    given = {k: v for k, v in vars(args).items() if k in BenchConfig.model_fields and v is not None}
    try:
        cfg = BenchConfig(**given)
        record = run_bench(cfg)
    except (ValidationError, ValueError) as err:
        raise ConfigError(str(err)) from None
    print(table(record))
    if cfg.out is not None:
        print(f"mme bench: wrote {cfg.out}", file=sys.stderr)
    return 0
