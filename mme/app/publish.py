"""What ``mme protect`` publishes by default: the owner's own photos, protected.

Every protected image goes back under its own file name (its path under INPUT for a folder, its
CSV cell, ``<id>.<ext>`` for shards and Hugging Face data), at its own width × height (the
clean original plus δ mapped onto it, :func:`mme.protection.native.protect_native`) and in its
own format: PNG, WebP (lossless), TIFF and BMP stay lossless; JPEG stays JPEG at
``jpeg_quality`` with 4:4:4 chroma (4:2:0 drops most of the noise in the colour channels:
docs/protect.md); GIF and the rest become PNG (``.png``). EXIF orientation is applied to the
pixels (as ``prepare`` does); GPS and every other EXIF field, XMP and comments are left out
unless ``keep_exif`` (then EXIF without its orientation tag); an RGB photo's ICC colour profile
is kept.

Captions go where they came from: a same-named ``.txt`` beside each image, or, for a CSV input,
a CSV of the same name with its image and caption columns (one row per caption); plus
``metadata.jsonl`` (``file_name``, ``text``, ``captions``, size, format: no local path) and
``README.txt``. The folder reads back with ``mme prepare --source folder`` (or ``--source csv``)
and Hugging Face ``imagefolder``.

Each image's source is read again (the same item ids as ``prepare``) for its name, format and
metadata; one whose bytes changed since ``prepare`` stops the run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from mme import fsio, shards
from mme.app.settings import ProtectConfig, data_config
from mme.config import ConfigError
from mme.ingest import hygiene
from mme.ingest.prepare import raw_items
from mme.protection import grid, native

# source format -> (published format, extension when the name must change)
FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "TIFF": "TIFF",
           "BMP": "BMP"}  # fmt: skip
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp"}
PICTURE_ROWS = 3  # photos in the run's before/after picture


@dataclass(frozen=True)
class SourceInfo:
    """What a published file takes over from its source: format, colour profile, EXIF."""

    format: str  # the published format (a key of EXTENSIONS)
    icc: bytes | None
    exif: bytes | None


def source_info(data: bytes, keep_exif: bool) -> SourceInfo:
    """The published format, ICC profile (RGB sources only) and, with ``keep_exif``, the EXIF
    without its orientation tag (the pixels are already turned) of a source image."""
    with Image.open(io.BytesIO(data), formats=hygiene.ALLOWED_FORMATS) as im:
        fmt = FORMATS.get(str(im.format), "PNG")
        icc = im.info.get("icc_profile") if im.mode == "RGB" else None
        exif = None
        if keep_exif:
            tags = im.getexif()
            tags.pop(ExifTags.Base.Orientation, None)
            exif = tags.tobytes() if len(tags) else None
    return SourceInfo(fmt, icc or None, exif)


def encode(pixels: np.ndarray, info: SourceInfo, jpeg_quality: int) -> bytes:
    """``(H, W, 3)`` uint8 pixels as ``info.format``: lossless except JPEG (4:4:4 chroma)."""
    kw: dict[str, Any] = {"icc_profile": info.icc} if info.icc else {}
    if info.exif and info.format in ("JPEG", "PNG", "WEBP"):
        kw["exif"] = info.exif
    if info.format == "JPEG":
        kw |= {"quality": jpeg_quality, "subsampling": 0}
    elif info.format == "WEBP":
        kw |= {"lossless": True, "quality": 100}
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(
        buf, format=info.format, **kw
    )
    return buf.getvalue()


class Names:
    """Published file names: the source's own when it has one and it is a plain relative path,
    else ``<id>.<ext>``; a name already taken (two sources, one name) gets ``_<id>``."""

    def __init__(self, kind: str, root: Path | None) -> None:
        self.kind, self.root, self.used = kind, root, set()

    def __call__(self, item: Any, fmt: str) -> str:
        own = self._own(item)
        name = own or f"{item.id}.{EXTENSIONS[fmt]}"
        stem, suffix = posixpath.splitext(name)
        if FORMATS.get(_format_of(suffix)) != fmt:  # e.g. a GIF published as PNG
            suffix = "." + EXTENSIONS[fmt]
        # captions in <stem>.txt: two images may not share a stem (a.jpg + a.png) there
        key = (stem if self.kind != "csv" else stem + suffix).lower()
        if key in self.used:
            stem = f"{stem}_{item.id}"
            key = (stem if self.kind != "csv" else stem + suffix).lower()
        self.used.add(key)
        return stem + suffix

    def _own(self, item: Any) -> str | None:
        if self.kind == "folder" and self.root is not None:
            return Path(item.source).relative_to(self.root).as_posix()
        if self.kind == "csv":  # the cell: kept when it is a plain relative POSIX path
            windows = "\\" in item.source
            cell = PureWindowsPath(item.source) if windows else PurePosixPath(item.source)
            plain = not windows and not cell.is_absolute() and ".." not in cell.parts
            return cell.as_posix() if plain else f"images/{cell.name}"
        return None


def _format_of(suffix: str) -> str:
    """The format a file name ending announces ("" when none)."""
    ext = suffix.lower().lstrip(".")
    known = {"jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "jfif": "JPEG", "png": "PNG",
             "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF", "bmp": "BMP"}  # fmt: skip
    return known.get(ext, "")


def check_unchanged(item: Any, data: bytes, clean: shards.Sample) -> None:
    """Stop when a source's bytes are not the ones ``prepare`` read (the input changed)."""
    if shards.sha256_bytes(data) != clean.meta.get("sha256"):
        raise ConfigError(
            f"{item.source} changed since this run read it: pass --force to start over"
        )


def record(item_id: str, name: str, captions: list[str], pixels: np.ndarray, fmt: str) -> str:
    """One ``metadata.jsonl`` line: no local path, nothing that names the trigger."""
    rec = {"id": item_id, "file_name": name, "text": captions[0], "captions": list(captions),
           "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
           "format": fmt}  # fmt: skip
    return json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n"


def readme(method: str, epsilon: float, counts: Counter, n_captions: int, quality: int) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return "\n".join(
        [
            "Protected image-caption data (unlearnable for CLIP-style training).",
            "",
            f"method: {method}",
            f"epsilon: {epsilon:g} (L-inf bound of the image noise, 0-255 pixel units, at "
            "each photo's own size; JPEG files hold it up to their compression)",
            f"images: {sum(counts.values())} ({kinds}); captions: {n_captions}",
            f"JPEG files: quality {quality}, 4:4:4 chroma. Re-encoding them at a lower quality "
            "weakens the noise.",
            "Files: each photo under its own name, its captions in a same-named .txt (or the "
            "CSV); metadata.jsonl (file_name, text, captions).",
            "Written by mme protect.",
            "",
        ]
    )


@dataclass
class Tally:
    """What was published: files per format, captions, and the photos of the picture."""

    formats: Counter
    captions: int = 0
    picture: list | None = None


def publish(cfg: ProtectConfig, dest: Path, summary: Path) -> dict[str, Any]:
    """Write the run's protected photos into the fresh folder ``dest`` (see module doc) and the
    before/after picture to ``summary``; returns ``{"images", "captions", "formats"}``."""
    dcfg, private = data_config(cfg), cfg.private_dir
    eps = native.set_geometry(private / "protected")[0]
    names = Names(dcfg.source, Path(dcfg.input) if dcfg.source == "folder" else None)
    tally = Tally(Counter(), picture=[])
    stream = native.native_pixels(
        private / "protected", "train", private / "clean", private / "noise"
    )
    with contextlib.ExitStack() as stack:
        index = stack.enter_context(fsio.atomic_open(dest / "metadata.jsonl", "w"))
        rows = None
        if dcfg.source == "csv":
            table = stack.enter_context(fsio.atomic_open(dest / Path(dcfg.csv).name, "w"))
            rows = csv.writer(table)
            rows.writerow([cfg.image_column, cfg.caption_column])
        find = _lookup(cfg)
        for p, c, pixels in stream:
            item = find(p.id)
            data = _source_bytes(item, c)
            info = source_info(data, cfg.keep_exif)
            name = names(item, info.format)
            file_bytes = encode(pixels, info, cfg.jpeg_quality)
            fsio.write_bytes(fsio.resolve_under(dest, name), file_bytes)
            _write_captions(dest, name, p.captions, rows)
            index.write(record(p.id, name, p.captions, pixels, info.format))
            tally.formats[info.format] += 1
            tally.captions += len(p.captions)
            if len(tally.picture) < PICTURE_ROWS:
                tally.picture.append((c.image(), _decode(file_bytes)))
    text = readme(_method(private), eps, tally.formats, tally.captions, cfg.jpeg_quality)
    fsio.write_text(dest / "README.txt", text)
    grid.save_before_after(summary / "before_after.png", tally.picture, eps)
    n = sum(tally.formats.values())
    return {"images": n, "captions": tally.captions, "formats": dict(tally.formats)}


def _lookup(cfg: ProtectConfig) -> Any:
    """``find(id)``: the source item of that id (the items come in ``prepare``'s order, so
    nothing is normally buffered)."""
    items, waiting = iter(raw_items(data_config(cfg))), {}

    def find(key: str) -> Any:
        try:
            return native.take(items, waiting, key)
        except ValueError:
            raise ConfigError(
                f"{cfg.input} changed since this run read it ({key} is gone): pass --force "
                "to start over"
            ) from None

    return find


def _source_bytes(item: Any, clean: shards.Sample) -> bytes:
    try:
        data = hygiene.load_bytes(item.load, item.source)
    except hygiene.Skip as err:
        raise ConfigError(
            f"{err}: the input changed since this run read it: pass --force"
        ) from None
    check_unchanged(item, data, clean)
    return data


def _write_captions(dest: Path, name: str, captions: list[str], rows: Any) -> None:
    if rows is not None:
        rows.writerows([name, c] for c in captions)
        return
    txt = fsio.resolve_under(dest, posixpath.splitext(name)[0] + ".txt")
    fsio.write_text(txt, "\n".join(captions) + "\n")


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _method(private: Path) -> str:
    return str(shards.load_manifest(private / "protected").get("config", {}).get("method", "?"))
