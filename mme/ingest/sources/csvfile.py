"""``source: csv``: one CSV row per caption (the MEM paper's split files); image paths relative
to ``image_root`` or the CSV's folder."""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

from mme import limits
from mme.ingest.sources.common import (
    RawItem,
    _file_loader,
    _is_utf8,
    _skipper,
    _unique_ids,
    printable,
)
from mme.ingest.sources.guard import InputGuard

# --------------------------------------------------------------------------------------- csv


def iter_csv(
    path: Path | str,
    *,
    image_column: str = "images",
    caption_column: str = "caption",
    delimiter: str = ",",
    image_root: Path | str | None = None,
    split: str | None = None,
    allow_absolute: bool = False,
) -> Iterator[RawItem]:
    """Images of a caption CSV (one row per caption), all captions of an image together.

    Rows are grouped by the image cell in first-seen order, whether or not they are adjacent.
    Relative image paths are resolved against ``image_root`` (default: the CSV's folder) and
    must stay under it (:mod:`mme.ingest.sources.guard`); paths that do not exist there, and
    absolute paths, are looked up under ``image_root`` by their ever shorter suffixes
    (``/data/flickr/Images/x.jpg`` -> ``root/data/flickr/Images/x.jpg``, ..., ``root/Images/
    x.jpg``, ``root/x.jpg``), so split files written on another machine work. An absolute path
    itself is read only with ``allow_absolute`` (else the item is skipped as ``outside_root``).
    """
    path = Path(path)
    # Read and validate now, not on the first next(): a bad column fails before any work starts.
    groups = _read_csv_groups(path, image_column, caption_column, delimiter)
    root = Path(image_root) if image_root is not None else path.parent
    return _csv_items(groups, InputGuard.at(root, allow_absolute), split)


def _csv_items(
    groups: dict[str, list[bytes]], guard: InputGuard, split: str | None
) -> Iterator[RawItem]:
    cells = list(groups)
    ids = _unique_ids(cells, _csv_id_variants)
    for cell, item_id in zip(cells, ids, strict=True):
        candidates, absolute = _path_candidates(cell, guard.root)
        load = _file_loader(cell, candidates, guard, absolute)
        if not _is_utf8(cell):
            load = _skipper("invalid_name", "the image cell is not valid UTF-8")
        yield RawItem(
            id=item_id,
            source=printable(cell),
            load=load,
            captions=tuple(groups[cell]),
            split=split,
        )


def _read_csv_groups(
    path: Path, image_column: str, caption_column: str, delimiter: str
) -> dict[str, list[bytes]]:
    """``{image cell: [caption bytes, ...]}`` in first-seen order.

    The file is decoded with ``surrogateescape`` and each caption re-encoded the same way, so
    invalid UTF-8 bytes survive unchanged to hygiene (which rejects them) instead of failing the
    whole file here. ``utf-8-sig`` drops a BOM that would otherwise rename the first column.
    """
    if len(delimiter) != 1:
        raise ValueError(f"{path}: delimiter must be one character, got {delimiter!r}")
    old_limit = csv.field_size_limit(limits.MAX_CSV_FIELD)  # the default, 128 KiB, is too low
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            return _group_rows(
                path, csv.DictReader(f, delimiter=delimiter), image_column, caption_column
            )
    finally:
        csv.field_size_limit(old_limit)


def _group_rows(
    path: Path, reader: csv.DictReader, image_column: str, caption_column: str
) -> dict[str, list[bytes]]:
    groups: dict[str, list[bytes]] = {}
    columns = reader.fieldnames or []
    for column in (image_column, caption_column):
        if column not in columns:
            present = ", ".join(map(repr, columns))
            raise ValueError(
                f"{path}: no column {column!r} (columns present: {present}; "
                f"delimiter {reader.reader.dialect.delimiter!r})"
            )
    try:
        for row in reader:
            image = row[image_column]
            if not image:
                raise ValueError(f"{path}, line {reader.line_num}: empty {image_column!r} cell")
            caption = row[caption_column] or ""
            groups.setdefault(image, []).append(caption.encode("utf-8", "surrogateescape"))
    except csv.Error as err:  # a cell over the cap, a stray NUL, ...: name the line
        # line_num counts the lines read before the record that failed
        raise ValueError(f"{path}, line {reader.line_num + 1}: {err}") from None
    return groups


def _csv_id_variants(cell: str) -> list[str]:
    parts = _split_path(cell)[1] or (cell,)
    without_ext = posixpath.splitext("/".join(parts))[0]
    return [posixpath.splitext(parts[-1])[0], without_ext, "/".join(parts)]


def _split_path(cell: str) -> tuple[bool, tuple[str, ...]]:
    """(is absolute, parts without the anchor) of a path written on POSIX or Windows."""
    pure: PurePath = PureWindowsPath(cell) if "\\" in cell else PurePosixPath(cell)
    parts = pure.parts[1:] if pure.anchor else pure.parts
    return bool(pure.anchor), tuple(parts)


def _path_candidates(cell: str, root: Path) -> tuple[list[Path], Path | None]:
    """Where the image of ``cell`` may be, in order, and the one that is the absolute path the
    cell names (None for a relative cell)."""
    is_abs, parts = _split_path(cell)
    first = [Path(cell)] if is_abs else [root.joinpath(*parts)]
    suffixes = [root.joinpath(*parts[i:]) for i in range(0 if is_abs else 1, len(parts))]
    # dedupe, keep order; without allow_absolute the absolute path itself is passed over
    return list(dict.fromkeys(first + suffixes)), Path(cell) if is_abs else None
