"""``mme evaluate``: image<->text retrieval of a trained victim on a clean test split.

Every test image is embedded once (open_clip's evaluation preprocessing for the model) and every
one of its captions is embedded (the model's tokenizer);
:func:`mme.victim.retrieval.retrieval_metrics` ranks image->text and text->image over cosine
similarity. The result is written atomically to
``metrics.json`` (flat, numeric: recalls in percent, median/mean ranks, ``rsum``, its chance level
and ``rsum_over_chance``, ``n_images``, ``n_captions``), printed as a table and logged to MLflow.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from mme import arguments, guard, models, paths, shards
from mme.config import ConfigError, EvaluateConfig, default_shards, section_from_args
from mme.track import plots, tracking
from mme.victim import retrieval

OWNER = "mme evaluate"
METRICS_FILE = guard.json_object_with("rsum", "rsum_over_chance")  # what --out may replace
PROVENANCE_KEYS = (
    "method",
    "epsilon",
    "trigger_len",
    "attack",
    "data_manifest_sha256",
    "n_pairs",
)


def checkpoint_record(checkpoint: Path | None) -> dict[str, Any]:
    """The ``mme`` record ``mme train`` stores in its checkpoints ({} for other checkpoints)."""
    if checkpoint is None:
        return {}
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    record = ck.get("mme") if isinstance(ck, dict) else None
    return record if isinstance(record, dict) else {}


def resolve_model_name(model: str | None, record: dict[str, Any]) -> str:
    """``model`` if given, else the one the checkpoint was trained as."""
    name = model or record.get("model")
    if not name:
        raise ValueError("the checkpoint does not name its model: pass --model")
    return name


class _Embedder:
    """Accumulates images and captions and embeds them in batches of ``batch_size``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int, device) -> None:
        self.model, self.tokenizer, self.bs, self.device = model, tokenizer, batch_size, device
        self.transform = models.val_transform(model)
        self.images: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.image_out: list[torch.Tensor] = []
        self.text_out: list[torch.Tensor] = []

    def add(self, sample: shards.Sample) -> None:
        with Image.open(io.BytesIO(sample.image_bytes)) as im:
            self.images.append(self.transform(im.convert("RGB")))
        self.captions.extend(sample.captions)
        self.flush(final=False)

    @torch.no_grad()
    def flush(self, final: bool) -> None:
        while self.images and (final or len(self.images) >= self.bs):
            batch, self.images = self.images[: self.bs], self.images[self.bs :]
            x = torch.stack(batch).to(self.device)
            self.image_out.append(self.model.encode_image(x).float().cpu())
        while self.captions and (final or len(self.captions) >= self.bs):
            batch, self.captions = self.captions[: self.bs], self.captions[self.bs :]
            t = self.tokenizer(batch).to(self.device)
            self.text_out.append(self.model.encode_text(t).float().cpu())


def embed_split(
    model: torch.nn.Module, tokenizer: Any, shard_dir: Path, split: str, batch_size: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of all images ``(N, D)`` and captions ``(M, D)`` of a split, + owners ``(M,)``."""
    emb = _Embedder(model, tokenizer, batch_size, device)
    counts = []
    for sample in tqdm(
        shards.iter_samples(shard_dir, split),
        desc=f"embed {split}",
        unit="img",
        file=sys.stderr,
        mininterval=5,
    ):
        emb.add(sample)
        counts.append(len(sample.captions))
    emb.flush(final=True)
    owner = retrieval.caption_index(counts)
    return torch.cat(emb.image_out), torch.cat(emb.text_out), owner


def evaluate_checkpoint(
    cfg: EvaluateConfig,
    checkpoint: Path | None,
    model: str | None,
    shards: Path,
    split: str = "test",
) -> dict[str, float]:
    """Retrieval metrics of ``checkpoint`` (or an untrained ``model`` if None) on ``split``.

    ``model`` may be None for checkpoints written by ``mme train`` (they name their model).
    Returns the keys of :func:`mme.victim.retrieval.retrieval_metrics` (all numbers).
    """
    record = checkpoint_record(checkpoint)
    name = resolve_model_name(model, record)
    device = models.resolve_device(cfg.device)
    net, tokenizer = models.create_model(name, pretrained=checkpoint, device=device)
    image_emb, text_emb, owner = embed_split(net, tokenizer, shards, split, cfg.batch_size, device)
    return retrieval.retrieval_metrics(image_emb, text_emb, owner)


def format_table(metrics: dict[str, float]) -> str:
    """A small fixed-width table of the metrics, one row per direction."""
    lines = [f"{'':12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'medr':>6} {'meanr':>7}"]
    for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
        r = [metrics[f"{d}_r{k}"] for k in (1, 5, 10)]
        lines.append(
            f"{label:12} {r[0]:6.1f} {r[1]:6.1f} {r[2]:6.1f} "
            f"{metrics[f'{d}_medr']:6.0f} {metrics[f'{d}_meanr']:7.1f}"
        )
    lines.append(
        f"rsum {metrics['rsum']:.1f} (chance {metrics['chance_rsum']:.1f}, "
        f"x{metrics['rsum_over_chance']:.2f}) on {metrics['n_images']:.0f} images / "
        f"{metrics['n_captions']:.0f} captions"
    )
    return "\n".join(lines)


def eval_params(
    record: dict[str, Any], model: str, checkpoint: Path | None, shard_dir: Path, split: str
) -> dict[str, Any]:
    """MLflow params: the victim and its training data (from the checkpoint) + the test data."""
    victim = record.get("victim") or {}
    test_sha = shards.manifest_sha256(shard_dir)
    params = {k: record.get(k) for k in PROVENANCE_KEYS}
    params |= {k: victim.get(k) for k in ("epochs", "batch_size", "lr")}
    params |= {
        "victim_model": model,
        "checkpoint": checkpoint,
        "eval_shards": shard_dir,
        "eval_split": split,
        "eval_manifest_sha256": test_sha,
    }
    return params


def evaluate_and_log(
    cfg: EvaluateConfig,
    checkpoint: Path,
    shard_dir: Path,
    split: str = "test",
    model: str | None = None,
    out: Path | None = None,
) -> dict[str, float]:
    """:func:`evaluate_checkpoint` inside an MLflow ``evaluate`` run (params: the victim, its
    training data and the test data); writes ``out`` (metrics JSON) when given: a new file or
    an earlier metrics file, never an input or another file (:mod:`mme.guard`)."""
    outputs = [guard.File(Path(out), METRICS_FILE)] if out is not None else []
    inputs = {"checkpoint": checkpoint, "test shards": shard_dir}
    with guard.claim(OWNER, outputs, inputs):
        record = checkpoint_record(checkpoint)
        name = resolve_model_name(model, record)
        params = eval_params(record, name, checkpoint, shard_dir, split)
        run_name = f"evaluate-{Path(checkpoint).parent.name}"
        stage = {"stage": "evaluate"}
        with tracking.start_run(tracking.experiment_name(), run_name, params, stage):
            metrics = evaluate_checkpoint(cfg, checkpoint, name, shard_dir, split)
            tracking.log_metrics(metrics)
            if out is not None:
                shards.write_json_atomic(out, metrics)
                tracking.log_artifact(out)
            if tracking.enabled():
                _log_recall_picture(metrics, Path(checkpoint).parent.name)
    return metrics


def _log_recall_picture(metrics: dict[str, float], label: str) -> None:
    """The recall@K picture as an MLflow artifact (a temporary file: nothing to keep on disk)."""
    with tempfile.TemporaryDirectory() as tmp:
        picture = plots.recall_chart({label: metrics}, Path(tmp) / "recall.png", label)
        if picture is not None:
            tracking.log_artifact(picture)


add_arguments = arguments.evaluate  # flags live where --help needs no torch


def run(args: argparse.Namespace) -> int:
    cfg = section_from_args("evaluate", args)
    shard_dir = args.shards or default_shards(args.params)
    checkpoint = args.checkpoint or paths.victim_run(shard_dir) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} not found: run `mme train` first")
    if not shards.shard_paths(shard_dir, args.split):
        raise ConfigError(f"no {args.split}-*.tar shards in {shard_dir}")
    out = args.out or checkpoint.parent / "metrics.json"
    inputs = {"checkpoint": checkpoint, "test shards": shard_dir}
    guard.check(OWNER, [guard.File(out, METRICS_FILE)], inputs)  # before loading anything
    try:
        record = checkpoint_record(checkpoint)
    except Exception as err:  # weights_only refusals, truncated files: not a checkpoint of ours
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"checkpoint {checkpoint} cannot be loaded safely: {why}") from None
    try:
        name = resolve_model_name(args.model, record)
        models.check_model_name(name)
        models.resolve_device(cfg.device)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    metrics = evaluate_and_log(cfg, checkpoint, shard_dir, args.split, name, out)
    print(format_table(metrics))
    print(f"mme evaluate: wrote {out}", file=sys.stderr)
    return 0
