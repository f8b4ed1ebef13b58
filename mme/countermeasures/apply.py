"""``mme attack``: what a data user might do to a published protected set, as a new shard set.

Reads every split of ``attack.protected`` (the shard readers of :mod:`mme.shards` validate its
keys and members) and writes ``attack.out`` (default ``data/attacked/<name>``, ``<name>`` =
:func:`mme.countermeasures.transforms.slug` of the spec): the same ids in the same order, each image
and/or caption transformed by ``attack.transform`` (:mod:`mme.countermeasures.transforms`), and a
``manifest.json`` written last that keeps the protected set's ``method``, ``epsilon`` and
``trigger_len`` and adds ``attack``, so ``mme train`` / ``mme evaluate`` log the attack as an
MLflow param and ``mme report`` shows it.
The input is never modified. ``detect-trigger``, ``detect-ngram`` and ``oracle-strip`` take two
passes over each split (:mod:`mme.countermeasures.text_pass`); ``score_private`` scores removed
words.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme import __version__, fsio, paths, shards
from mme.config import AttackConfig, ConfigError, add_section_arguments, section_from_args
from mme.countermeasures import detect, text_pass, transforms

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
    return manifest


def attack_sample(
    spec: transforms.AttackSpec,
    sample: shards.Sample,
    seed: int,
    removed: list[detect.Window | None] | None = None,
) -> shards.Sample:
    """``sample`` with its image and captions transformed by ``spec`` (``removed``: the caption
    windows of a whole-split transform, :mod:`mme.countermeasures.text_pass`); metadata updated."""
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
    passes: text_pass.TextPass,
) -> dict[str, Any]:
    """Transform one split into ``out``; returns ``{"images", "captions", "shards"}``."""
    passes.fit(split)
    writer = shards.ShardWriter(out, split, cfg.shard_size)
    it = shards.iter_samples(cfg.protected, split)
    for sample in tqdm(it, total=n, desc=f"{spec} {split}", unit="img", file=sys.stderr):
        removed = passes.windows(sample)
        attacked = attack_sample(spec, sample, cfg.seed, removed)
        writer.write(attacked)
        passes.record(sample, removed, attacked.captions)
    records = writer.close()
    return {"images": writer.n_samples, "captions": writer.n_captions, "shards": records}


def attack(cfg: AttackConfig) -> dict[str, Any]:
    """Write the attacked copy of ``cfg.protected``; returns its manifest."""
    source = check_inputs(cfg)
    spec = text_pass.resolve(transforms.parse_spec(cfg.transform), source)
    out = output_dir(cfg)
    passes = text_pass.TextPass(cfg, spec, out)  # private tables load before anything is written
    out.mkdir(parents=True, exist_ok=True)
    # while shards are being replaced no manifest may describe the folder
    (out / "manifest.json").unlink(missing_ok=True)
    splits = {}
    for split, info in source["splits"].items():
        if not shards.shard_paths(cfg.protected, split):
            continue
        n = info.get("images") if isinstance(info, dict) else None
        n = n if isinstance(n, int) else None
        splits[split] = attack_split(cfg, spec, split, out, n, passes)
    manifest = output_manifest(cfg, spec, source, splits)
    fsio.write_json(out / "manifest.json", manifest)
    counts = ", ".join(f"{s} {v['images']}" for s, v in splits.items())
    print(f"mme attack: {spec}: {cfg.protected} -> {out} ({counts} images)", file=sys.stderr)
    passes.finish()
    return manifest


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
        "config": cfg.model_dump(mode="json", exclude=set(text_pass.NOT_RECORDED))
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
