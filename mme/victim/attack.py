"""``mme attack``: what a data user might do to a published protected set, as a new shard set.

Reads every split of ``attack.protected`` (the shard readers of :mod:`mme.shards` validate its
keys and members) and writes ``attack.out`` (default ``data/attacked/<name>``, ``<name>`` =
:func:`mme.victim.transforms.slug` of the spec): the same ids in the same order, each image
and/or caption transformed by ``attack.transform`` (:mod:`mme.victim.transforms`), and a
``manifest.json`` written last that keeps the protected set's ``method``, ``epsilon`` and
``trigger_len`` and adds ``attack``, so ``mme train`` / ``mme evaluate`` log the attack as an
MLflow param and ``mme report`` shows it.
The input is never modified.

``detect-trigger``, ``detect-ngram`` (:mod:`mme.victim.detect`) and ``oracle-strip``
(:mod:`mme.victim.oracle`) take two passes over each split: the captions first (corpus
statistics, or the private triggers), then the transform. With ``score_private`` the removed
words are scored against a private ``triggers.json`` (:mod:`mme.victim.score`, measuring only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme import __version__, fsio, paths, shards
from mme.config import AttackConfig, ConfigError, add_section_arguments, section_from_args
from mme.victim import detect, oracle, score, transforms

# private paths and measuring flags: no part of what the data depends on, never published
NOT_RECORDED = ("private", "score_private", "score_out")
CARRIED_KEYS = (
    "method",
    "epsilon",
    "trigger_len",
    "trigger_position",
    "working_size",
    "n_protected",
)


def output_dir(cfg: AttackConfig) -> Path:
    """``cfg.out``, else ``data/attacked/<slug of the spec>``."""
    return Path(cfg.out) if cfg.out is not None else paths.ATTACKED / transforms.slug(cfg.transform)


def check_inputs(cfg: AttackConfig) -> dict[str, Any]:
    """The protected set's manifest; fails before any work on a missing set or out == input."""
    try:
        manifest = shards.load_manifest(cfg.protected)
    except FileNotFoundError as err:
        raise ConfigError(f"attack.protected = {str(cfg.protected)!r}: {err}") from None
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ConfigError(f"attack.protected = {str(cfg.protected)!r}: manifest lists no splits")
    bad = [s for s in splits if not shards.KEY_RE.match(str(s))]
    if bad:  # split names become file names: nothing that could leave the folder
        raise ConfigError(f"attack.protected = {str(cfg.protected)!r}: bad split names {bad}")
    if output_dir(cfg).resolve() == Path(cfg.protected).resolve():
        raise ConfigError("attack.out must differ from attack.protected (the input is kept)")
    if cfg.score_out is not None:  # a private-derived file lands in no data folder
        dest = Path(cfg.score_out).resolve()
        for d in (cfg.protected, output_dir(cfg), cfg.private, cfg.score_private):
            if d is not None and dest.is_relative_to(Path(d).resolve()):
                raise ConfigError(f"attack.score_out = {str(cfg.score_out)!r} is inside {d}")
    return manifest


Remover = Callable[[str, list[str]], list[detect.Window | None]]  # (id, captions) -> windows


@dataclass
class PrivateReads:
    """Everything a run reads from private folders, loaded before any output is written:
    oracle-strip's table (``cfg.private``) and the score's (``cfg.score_private``). The
    detectors are never handed either."""

    oracle: oracle.TriggerTable | None = None
    truth: oracle.TriggerTable | None = None
    score: score.Score = field(default_factory=score.Score)

    @classmethod
    def load(cls, cfg: AttackConfig, spec: transforms.AttackSpec) -> PrivateReads:
        table = oracle.TriggerTable.load
        return cls(
            table(cfg.private) if spec.name == "oracle-strip" else None,
            table(cfg.score_private) if cfg.score_private is not None else None,
        )


def remover(
    cfg: AttackConfig, spec: transforms.AttackSpec, split: str, table: oracle.TriggerTable | None
) -> Remover | None:
    """The caption windows of a whole-split transform (None for the others): a detector fitted
    on the protected split's captions alone, or oracle-strip's private ``table``."""
    if spec.name in detect.DETECTORS:
        caps = (c for s in shards.iter_samples(cfg.protected, split) for c in s.captions)
        det = detect.Detector(spec.name, int(spec.arg), detect.fit(caps))
        return lambda key, captions: det.windows(captions)
    return table.windows if spec.name == "oracle-strip" and table is not None else None


def attack_sample(
    spec: transforms.AttackSpec,
    sample: shards.Sample,
    seed: int,
    removed: list[detect.Window | None] | None = None,
) -> shards.Sample:
    """``sample`` with its image and captions transformed by ``spec`` (``removed``: the caption
    windows of a whole-split transform); metadata updated."""
    pixels = sample.image()
    image = transforms.attack_image(spec, pixels)
    if image is None:  # text attack: the image bytes stay exactly as published
        data, ext = sample.image_bytes, sample.image_ext
    elif isinstance(image, tuple):  # an encoding: keep its bytes, as the user would
        data, ext = image
        pixels = transforms.decode(data)
    else:
        data, ext, pixels = shards.encode_png(image), "png", image
    meta = shards.public_meta(sample.meta)  # a data user never sees the private keys
    meta.update(
        {
            "attack": str(spec),
            "sha256": shards.sha256_bytes(data),
            "width": int(pixels.shape[1]),
            "height": int(pixels.shape[0]),
            "before_attack_sha256": shards.sha256_bytes(sample.image_bytes),
        }
    )
    if removed is not None:
        captions = detect.apply(sample.captions, removed)
    else:
        captions = transforms.attack_captions(spec, sample.captions, sample.id, seed)
    return shards.Sample(sample.id, data, ext, captions, meta)


def attack_split(
    cfg: AttackConfig,
    spec: transforms.AttackSpec,
    split: str,
    out: Path,
    n: int | None,
    private: PrivateReads | None = None,
) -> dict[str, Any]:
    """Transform one split into ``out``; returns ``{"images", "captions", "shards"}``."""
    private = private if private is not None else PrivateReads()
    windows = remover(cfg, spec, split, private.oracle)
    writer = shards.ShardWriter(out, split, cfg.shard_size)
    it = shards.iter_samples(cfg.protected, split)
    for sample in tqdm(it, total=n, desc=f"{spec} {split}", unit="img", file=sys.stderr):
        removed = windows(sample.id, sample.captions) if windows is not None else None
        attacked = attack_sample(spec, sample, cfg.seed, removed)
        writer.write(attacked)
        if private.truth is not None:
            cut = removed if removed is not None else score.removed_by(spec, sample.captions)
            private.score.add(private.truth, sample.id, sample.captions, cut, attacked.captions)
    records = writer.close()
    return {"images": writer.n_samples, "captions": writer.n_captions, "shards": records}


def attack(cfg: AttackConfig) -> dict[str, Any]:
    """Write the attacked copy of ``cfg.protected``; returns its manifest."""
    source = check_inputs(cfg)
    spec = transforms.parse_spec(cfg.transform)
    if spec.name in transforms.K_FROM_MANIFEST and spec.arg is None:
        spec = transforms.AttackSpec(spec.name, detect.public_k(source))
    private = PrivateReads.load(cfg, spec)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # while shards are being replaced no manifest may describe the folder
    (out / "manifest.json").unlink(missing_ok=True)
    splits = {}
    for split, info in source["splits"].items():
        if not shards.shard_paths(cfg.protected, split):
            continue
        n = info.get("images") if isinstance(info, dict) else None
        n = n if isinstance(n, int) else None
        splits[split] = attack_split(cfg, spec, split, out, n, private)
    manifest = output_manifest(cfg, spec, source, splits)
    fsio.write_json(out / "manifest.json", manifest)
    counts = ", ".join(f"{s} {v['images']}" for s, v in splits.items())
    print(f"mme attack: {spec}: {cfg.protected} -> {out} ({counts} images)", file=sys.stderr)
    if private.truth is not None:
        write_score(cfg, spec, private.score.summary())
    return manifest


def write_score(cfg: AttackConfig, spec: transforms.AttackSpec, summary: dict[str, Any]) -> None:
    """Print the score (and write ``cfg.score_out``): a measurement, not part of the data."""
    print(score.line(str(spec), summary), file=sys.stderr)
    if cfg.score_out is not None:
        record = {"attack": str(spec), "protected": str(cfg.protected)}
        record["private"] = str(cfg.score_private)
        fsio.write_json(cfg.score_out, record | summary)


def output_manifest(
    cfg: AttackConfig,
    spec: transforms.AttackSpec,
    source: dict[str, Any],
    splits: dict[str, Any],
) -> dict[str, Any]:
    """The attacked set's description: what it came from and what was done to it; only what the
    data depends on, so the same inputs give the same bytes (the same dataset version)."""
    carried = {k: source[k] for k in CARRIED_KEYS if isinstance(source.get(k), (str, int, float))}
    return {
        "created_by": "mme attack",
        "version": __version__,
        **carried,
        "method": carried.get("method", "clean"),
        "attack": str(spec),
        "config": cfg.model_dump(mode="json", exclude=set(NOT_RECORDED))
        | {"out": str(output_dir(cfg))},
        "source": str(cfg.protected),
        "source_manifest_sha256": shards.manifest_sha256(cfg.protected),
        "splits": splits,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_section_arguments(parser, "attack")


def run(args: argparse.Namespace) -> int:
    cfg = section_from_args("attack", args)
    attack(cfg)
    return 0
