"""``mme export``: write a protected set as plain files for publishing.

Formats:

- ``folder``: ``DIR/<id>.png`` + ``DIR/<id>.txt`` (captions, one per line) for every protected
  image, plus ``DIR/metadata.jsonl`` (one JSON object per image: its file names and shard meta)
  and ``DIR/README.txt`` (method, ε, counts). ``metadata.jsonl`` carries ``file_name`` and ``text``
  (the first caption; ``captions`` has all), so ``datasets.load_dataset("imagefolder",
  data_dir=DIR)`` loads it with its captions. It reads back with
  ``mme prepare --source folder --input DIR``, which takes exactly the images and their
  same-named ``.txt`` files. A set with several splits gets one subfolder per split.
- ``webdataset``: the shards as they are, plus a ``manifest.json`` and ``README.txt``.

The export is public-only by construction: it reads nothing but the protected shards and their
manifest (``noise.npy``, ``triggers.json`` and ``grid.png`` live in the run's private folder,
never here), and it passes on no metadata key that names the trigger or the protected images
(:data:`mme.shards.PRIVATE_META`; a set made before they became private is cleaned in
``folder`` format and refused in ``webdataset`` format, whose shards are copied byte for byte).
The input is treated as hostile: every sample id must be a plain key
(``[A-Za-z0-9_-]+``) and every file is resolved under ``DIR``, so a crafted shard cannot write
elsewhere. ``DIR`` may not equal, contain or sit inside the input. The export is built in a
hidden folder beside ``DIR`` and renamed into place at the end, so ``DIR`` is either complete or
absent; an existing non-empty ``DIR`` is replaced only with ``force``, and only when an earlier
``mme export`` made it.

``native`` (folder only): each image is the clean original at its own size with δ mapped onto it
(:mod:`mme.protection.native`; needs the clean shards and the private ``noise.npy``), instead of the
working-size crop. ``mme verify --native DIR`` checks such a folder at native size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mme import __version__, fsio, guard
from mme.manifest import Manifest
from mme.shards import (
    PRIVATE_META,
    iter_samples,
    load_manifest,
    names_local_path,
    public_meta,
    shard_paths,
)

FORMATS = ("folder", "webdataset")
OWNER = "mme export"


def export(
    protected: Path,
    out: Path,
    fmt: str = "folder",
    force: bool = False,
    native: dict[str, Path | None] | None = None,
    command: str = OWNER,
) -> dict[str, Any]:
    """Export the protected set in ``protected`` to ``out`` in format ``fmt`` (see module doc).

    Returns ``{"format", "out", "splits": {split: {"images", "captions"}}}``. Raises
    FileNotFoundError for a missing set / manifest / shards, ValueError for an unknown ``fmt``
    or a bad sample id, and :class:`mme.guard.OutputRefused` (a ValueError) for an ``out`` that
    overlaps an input, was not made by ``command`` (``mme protect`` exports as itself), is busy,
    or holds an earlier export and ``force`` is false. ``native`` (``{"clean": DIR|None,
    "private": DIR}``, None: off) exports native-size images.
    """
    protected, out = Path(protected), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (allowed: {', '.join(FORMATS)})")
    if native is not None and fmt != "folder":
        raise ValueError("--native exports a folder: use --format folder")
    if not protected.is_dir():
        raise FileNotFoundError(f"protected folder {protected} not found")
    manifest = load_manifest(protected)
    splits = [s for s in manifest.get("splits", {}) if shard_paths(protected, s)]
    if not splits:
        raise FileNotFoundError(f"{protected} has no shards of the splits in its manifest")
    inputs = {"input": protected, **{f"--{k}": v for k, v in (native or {}).items()}}
    folder = guard.Folder(out, needs_force=True, staged=True)
    settings = {"format": fmt, "native": native is not None}
    with guard.claim(command, [folder], inputs, force=force, settings=settings) as claim:
        partial = fsio.staging_dir(out)
        try:
            if fmt == "folder":
                counts = _write_folder(protected, partial, splits, native)
            else:
                counts = _write_webdataset(protected, partial, splits, manifest)
            _write_readme(partial / "README.txt", manifest, fmt, counts, native is not None)
            claim.mark(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        fsio.replace_dir(partial, out)
    return {"format": fmt, "out": str(out), "splits": counts}


def _write_folder(
    protected: Path, dest: Path, splits: list[str], native: dict[str, Path | None] | None = None
) -> dict[str, dict[str, int]]:
    """Image + caption file per sample; metadata.jsonl; one subfolder per split if several."""
    from mme.protection.native import native_samples

    counts = {}
    with fsio.atomic_open(dest / "metadata.jsonl", "w") as index:
        for split in splits:
            folder = dest / split if len(splits) > 1 else dest
            folder.mkdir(exist_ok=True)
            n = n_caps = 0
            samples = (
                iter_samples(protected, split)
                if native is None
                else native_samples(protected, split, **native)
            )
            for s in tqdm(samples, desc=f"export {split}", unit="img", file=sys.stderr):
                # ids are validated by the shard reader; resolving under dest is the backstop
                prefix = f"{split}/" if len(splits) > 1 else ""
                image = fsio.resolve_under(dest, f"{prefix}{s.id}.{s.image_ext}")
                if image.exists():  # a repeated id would silently overwrite the first one
                    raise ValueError(f"{protected}: sample id {s.id} occurs twice in {split}")
                fsio.write_bytes(image, s.image_bytes)
                # one caption per line with a final newline: what the folder reader splits on
                fsio.write_text(image.with_suffix(".txt"), "\n".join(s.captions) + "\n")
                rel = image.relative_to(dest.resolve()).as_posix()
                # sets made before the trigger left the meta still carry it: never copied on
                # source is a local path (the clean folder, an original file): not published
                meta = {k: v for k, v in public_meta(s.meta).items() if k != "source"}
                record = {**meta, "id": s.id, "split": split, "file": rel}
                record["captions_file"] = rel.rsplit(".", 1)[0] + ".txt"
                # Hugging Face `datasets` imagefolder reads file_name (and text: the caption)
                record |= {"file_name": rel, "text": s.captions[0], "captions": list(s.captions)}
                index.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
                n, n_caps = n + 1, n_caps + len(s.captions)
            counts[split] = {"images": n, "captions": n_caps}
    return counts


def _write_webdataset(
    protected: Path, dest: Path, splits: list[str], manifest: dict[str, Any]
) -> dict[str, dict[str, int]]:
    """Copy the shards byte for byte, once each has been read through (every key, caption and
    metadata member validated: a crafted shard is not passed on); a manifest without local
    paths or side files."""
    for split in splits:
        for s in iter_samples(protected, split):
            leaked = sorted(k for k in PRIVATE_META if k in s.meta)
            leaked += ["source (a local path)"] if names_local_path(s.meta) else []
            if leaked:  # shards are copied byte for byte: an old set's meta cannot be cleaned
                raise ValueError(
                    f"{protected}: sample {s.id} names {leaked} in its public metadata (a set"
                    " made before these keys became private): re-run mme poison, or export"
                    " --format folder, which leaves them out"
                )
        for tar in tqdm(shard_paths(protected, split), desc=f"export {split}", file=sys.stderr):
            shutil.copyfile(tar, dest / tar.name)
    counts = {s: {k: manifest["splits"][s].get(k) for k in ("images", "captions")} for s in splits}
    published = {
        "created_by": "mme export",
        "mme_version": __version__,
        "exported_from": manifest.get("created_by"),
        "config": public_config(manifest.get("config", {})),
        "working_size": manifest.get("working_size"),
        "splits": {s: manifest["splits"][s] for s in splits},
    }
    fsio.write_json(dest / "manifest.json", published)
    return counts


PRIVATE_CONFIG = ("seed", "noise_seed", "clean", "out", "private", "work")


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The poison config without what older manifests carried: ``seed`` (with it, the protected
    subset and the trigger positions can be recomputed) and local paths."""
    return {k: v for k, v in config.items() if k not in PRIVATE_CONFIG}


def _write_readme(
    path: Path, manifest: dict[str, Any], fmt: str, counts: dict, native: bool = False
) -> None:
    cfg = manifest.get("config", {})
    eps, size = cfg.get("epsilon", "?"), manifest.get("working_size", "?")
    eps = f"{eps:g}" if isinstance(eps, int | float) else eps
    lines = [
        "Protected image-caption data (unlearnable for CLIP-style training).",
        "",
        f"method: {cfg.get('method', '?')}",
        f"epsilon: {eps} (L-inf bound of the image noise, 0-255 pixel units, "
        + ("at each image's own size)" if native else f"at {size}x{size} px)"),
        f"trigger length: {Manifest.model_validate(manifest).trigger_len or 0} word token(s) "
        "in each caption (at the start, or with trigger_position random at a word of its own)",
        f"tokenizer: {cfg.get('model', '?')}",
    ]
    lines += [f"{s}: {c['images']} images, {c['captions']} captions" for s, c in counts.items()]
    if fmt == "folder":
        lines += ["", "Files: <id>.png with captions in <id>.txt (one per line); metadata.jsonl."]
    else:
        lines += ["", "Files: WebDataset shards (<split>-NNNNNN.tar) and manifest.json."]
    lines += [
        "The images are stored losslessly; re-encoding them (e.g. as JPEG) weakens the noise.",
        f"Written by mme {__version__} (mme export --format {fmt}).",
    ]
    fsio.write_text(path, "\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protected", type=Path, required=True, help="protected set (mme poison)")
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--format", choices=FORMATS, default="folder", help="default: folder")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--native", action="store_true", help="images at the originals' own size (folder format)"
    )
    parser.add_argument(
        "--clean", type=Path, default=None, help="--native: clean shards (default: manifest's)"
    )
    parser.add_argument(
        "--private",
        type=Path,
        default=None,
        help="--native: the poison run's private folder (noise.npy, triggers.json)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        native = {"clean": args.clean, "private": args.private} if args.native else None
        result = export(args.protected, args.out, args.format, args.force, native)
    except (FileNotFoundError, ValueError) as err:
        print(f"mme export: {err}", file=sys.stderr)
        return 2
    total = sum(c["images"] or 0 for c in result["splits"].values())
    print(f"mme export: {total} images -> {result['out']} ({result['format']})", file=sys.stderr)
    return 0
