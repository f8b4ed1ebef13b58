"""``mme prepare``: ingest a dataset into WebDataset shards plus ``manifest.json``.

Sources: ``synthetic`` (the embedded default, generated here), ``csv`` (the MEM paper's split
files), ``folder`` (images with same-named ``.txt``), ``webdataset`` (existing shards), ``hf`` (a
local ``datasets`` save_to_disk folder or parquet). Broken
input is skipped and counted with its reason (manifest + one stderr line); ``--strict`` turns any
skip into a non-zero exit. The input is never modified: ``out`` may not equal, contain or sit
inside an input. Shards are byte-identical for the same inputs and params. The new version is
built in a hidden folder beside ``out`` (locked against a second writer) and replaces ``out``
only once complete, so a failed run leaves the previous version as it was; ``out`` is replaced
only when an earlier ``mme prepare`` made it.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme import __version__, fsio, guard
from mme.config import ConfigError, DataConfig, add_section_arguments, section_from_args
from mme.manifest import write_manifest
from mme.shards import Sample, ShardWriter, sha256_bytes

SPLITS = ("train", "test")
OWNER = "mme prepare"


def hash_split(key: str, test_fraction: float) -> str:
    """Deterministic split by image id: the same id always lands in the same split."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "test" if u < test_fraction else "train"


def raw_items(cfg: DataConfig) -> Iterator[Any]:
    """The source's items (:class:`~mme.ingest.sources.common.RawItem`), in the order
    ``prepare`` reads them: the same ids, so a later stage can go back to an item's source."""
    from mme.ingest import sources

    if cfg.source == "folder":
        yield from sources.iter_folder(cfg.input)
    elif cfg.source == "webdataset":
        yield from sources.iter_webdataset(cfg.input)
    elif cfg.source == "hf":
        cols = dict(image_column=cfg.image_column, caption_column=cfg.caption_column)
        yield from sources.iter_hf(cfg.input, **cols)
    else:  # csv: either one file (split by hash) or the paper's separate train/test files
        csv_kw = dict(
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
            delimiter=cfg.delimiter,
            image_root=cfg.image_root,
            allow_absolute=cfg.allow_absolute_paths,
        )
        if cfg.csv is not None:
            yield from sources.iter_csv(cfg.csv, **csv_kw)
        for split, path in (("train", cfg.train_csv), ("test", cfg.test_csv)):
            if path is not None:
                yield from sources.iter_csv(path, split=split, **csv_kw)


def clean_item(item: Any, cfg: DataConfig, dups: Any, skipped: list[dict]) -> Sample:
    """Validate one raw item into a Sample; raises hygiene.Skip for a broken one (dropped
    captions are appended to ``skipped``). ``mme protect --dry-run`` runs the same checks."""
    from mme.ingest import hygiene

    data = hygiene.load_bytes(item.load, item.source)
    captions, dropped = hygiene.clean_captions(item.captions)
    for reason, detail in dropped:  # a dropped caption is counted, the image may still be kept
        skipped.append({"id": item.id, "source": item.source, "reason": reason, "detail": detail})
    if not captions:
        raise hygiene.Skip("no_valid_captions", f"{len(item.captions)} caption(s), none usable")
    img = hygiene.clean_image(
        data, min_side=cfg.min_side, max_pixels=cfg.max_pixels, max_side=cfg.max_side
    )
    dups.check(item.id, data)
    meta = {
        "id": item.id,
        "source": item.source,
        "sha256": sha256_bytes(data),
        "width": img.width,
        "height": img.height,
    }
    if img.converted_from:
        meta["converted_from"] = img.converted_from
    return Sample(item.id, img.image_bytes, img.ext, captions, meta)


def _external_samples(cfg: DataConfig, skipped: list[dict]) -> Iterator[tuple[str, Sample]]:
    from mme.ingest import hygiene

    dups = hygiene.DuplicateFilter()
    seen: set[str] = set()
    for item in tqdm(raw_items(cfg), desc="prepare", unit="img", file=sys.stderr):
        try:
            if item.id in seen:  # two source files mapping to one key would collide in a tar
                raise hygiene.Skip("duplicate_id", f"id {item.id} already used")
            sample = clean_item(item, cfg, dups, skipped)
        except hygiene.Skip as skip:
            skipped.append(
                {"id": item.id, "source": item.source, "reason": skip.reason, "detail": skip.detail}
            )
            continue
        seen.add(item.id)
        yield item.split or hash_split(item.id, cfg.test_fraction), sample


def _synthetic_samples(cfg: DataConfig) -> Iterator[tuple[str, Sample]]:
    from mme.ingest import synthetic

    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        kw = dict(image_size=cfg.image_size, captions_per_image=cfg.captions_per_image)
        gen = synthetic.generate(split, n, seed=cfg.seed, **kw)
        for sample in tqdm(gen, total=n, desc=f"synthetic {split}", unit="img", file=sys.stderr):
            yield split, sample


def check_inputs(cfg: DataConfig) -> None:
    """Fail before any work, in one line naming the fix, when an input path does not exist."""
    files = {"csv": cfg.csv, "train_csv": cfg.train_csv, "test_csv": cfg.test_csv}
    for key, path in files.items():
        if cfg.source == "csv" and path is not None and not Path(path).is_file():
            raise ConfigError(f"data.{key} = {str(path)!r}: no such CSV file: fix the path")
    if cfg.source == "csv" and cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise ConfigError(
            f"data.image_root = {str(cfg.image_root)!r}: no such folder: give the folder the "
            "CSV's image paths are relative to"
        )
    if cfg.source == "folder" and not Path(cfg.input).is_dir():
        raise ConfigError(
            f"data.input = {str(cfg.input)!r}: no such folder: give the folder of images "
            "(each with a same-named .txt of captions)"
        )
    if cfg.source == "hf" and not Path(cfg.input).exists():
        raise ConfigError(
            f"data.input = {str(cfg.input)!r}: not found: give a datasets save_to_disk folder, "
            "a .parquet file or a folder of them"
        )
    pattern = "{" in str(cfg.input) or "*" in str(cfg.input)
    if cfg.source == "webdataset" and not pattern and not Path(cfg.input).exists():
        raise ConfigError(
            f"data.input = {str(cfg.input)!r}: no such folder or tar: give the shard folder, "
            "a .tar or a brace pattern"
        )


def input_paths(cfg: DataConfig) -> dict[str, Path | None]:
    """What ``cfg`` reads, by name, for the check that ``out`` stays clear of it."""
    found: dict[str, Path | None] = {}
    if cfg.input is not None:
        from braceexpand import braceexpand

        for i, path in enumerate(braceexpand(str(cfg.input))):
            found[f"input {i}" if i else "input"] = Path(path)
    for name in ("csv", "train_csv", "test_csv", "image_root"):
        found[name] = getattr(cfg, name)
    return found


def prepare(cfg: DataConfig) -> dict[str, Any]:
    """Write ``cfg.out/{train,test}-*.tar`` and ``cfg.out/manifest.json``; return the manifest."""
    check_inputs(cfg)
    out = guard.Folder(Path(cfg.out), flag="data.out", staged=True)
    settings = cfg.model_dump(mode="json")
    with guard.claim(OWNER, [out], input_paths(cfg), settings=settings) as claim:
        stage = fsio.staging_dir(Path(cfg.out))
        try:
            claim.mark(stage, out)
            manifest = _prepare_into(cfg, stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        fsio.replace_dir(stage, Path(cfg.out))
    return manifest


def _prepare_into(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """The whole dataset into the fresh folder ``out`` (the staging folder of ``cfg.out``)."""
    skipped: list[dict] = []
    writers = {s: ShardWriter(out, s, cfg.shard_size) for s in SPLITS}
    stream = (
        _synthetic_samples(cfg) if cfg.source == "synthetic" else _external_samples(cfg, skipped)
    )
    for split, sample in stream:
        writers[split].write(sample)
    splits = {}
    for split, w in writers.items():
        shards = w.close()
        splits[split] = {"images": w.n_samples, "captions": w.n_captions, "shards": shards}
    manifest = {
        "created_by": "mme prepare",
        "version": __version__,
        # a flag added later, at its default: left out, so the same input keeps its version
        "config": cfg.model_dump(mode="json", exclude=_later_defaults(cfg)),
        "splits": splits,
        "skipped": skipped,
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
    }
    if splits["train"]["images"] + splits["test"]["images"] == 0:
        raise SystemExit(f"mme prepare: no usable images in the input ({summary(manifest)})")
    write_manifest(out, manifest)
    return manifest


def _later_defaults(cfg: DataConfig) -> set[str]:
    return set() if cfg.allow_absolute_paths else {"allow_absolute_paths"}


def summary(manifest: dict[str, Any]) -> str:
    """One line: counts per split and skips per reason."""
    parts = [
        f"{s} {v['images']} images / {v['captions']} captions"
        for s, v in manifest["splits"].items()
    ]
    counts = manifest["skipped_counts"]
    skips = ", ".join(f"{r} {n}" for r, n in counts.items()) if counts else "none"
    return f"{'; '.join(parts)}; skipped: {skips}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_section_arguments(parser, "data")


def run(args: argparse.Namespace) -> int:
    cfg = section_from_args("data", args)
    try:
        manifest = prepare(cfg)
    except ValueError as err:  # an unusable input as a whole (bad CSV, non-tar shard): say so
        print(f"mme prepare: {err}", file=sys.stderr)
        return 2
    print(f"mme prepare: {cfg.out}: {summary(manifest)}", file=sys.stderr)
    if cfg.strict and manifest["skipped"]:
        for s in manifest["skipped"]:
            print(f"  {s['reason']}: {s['id']} ({s['source']}): {s['detail']}", file=sys.stderr)
        print("mme prepare: --strict: input had problems (listed above)", file=sys.stderr)
        return 1
    return 0
