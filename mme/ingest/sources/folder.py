"""``source: folder``: images with same-named ``.txt`` captions (one per line), optionally in
``train/`` and ``test/`` subfolders."""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

from mme import fsio, limits
from mme.ingest.sources.common import (
    IMAGE_SUFFIXES,
    SPLITS,
    RawItem,
    _file_loader,
    _is_utf8,
    _raiser,
    _skipper,
    _unique_ids,
    printable,
)
from mme.ingest.sources.guard import InputGuard

# ------------------------------------------------------------------------------------ folder


def iter_folder(root: Path | str) -> Iterator[RawItem]:
    """Images under ``root`` (recursive, sorted by path), captions from same-named ``.txt`` files.

    A ``.txt`` holds one caption per line; a missing one gives ``captions=()``. If ``root`` has
    both ``train/`` and ``test/`` subfolders, they define the split and every image must be inside
    one of them. Hidden files and folders (``.name``, e.g. macOS ``._x.jpg`` forks) are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "image folder not found", str(root))
    rels = _list_images(root)
    has_split = all((root / s).is_dir() for s in SPLITS)
    if has_split:
        outside = [r for r in rels if r.split("/", 1)[0] not in SPLITS]
        if outside:
            raise ValueError(
                f"{root} has train/ and test/ subfolders, but {len(outside)} images are in "
                f"neither (e.g. {', '.join(outside[:3])}): move them or remove the split folders"
            )
    return _folder_items(root, rels, has_split)


def _folder_items(root: Path, rels: list[str], has_split: bool) -> Iterator[RawItem]:
    guard = InputGuard.at(root)  # links are followed only to files inside root or a DVC cache
    ids = _unique_ids(rels, lambda rel: [posixpath.splitext(rel)[0], rel])
    for rel, item_id in zip(rels, ids, strict=True):
        path = root / rel
        load, captions = _file_loader(str(path), [path], guard), ()
        if not _is_utf8(rel):
            load = _skipper("invalid_name", "the file name is not valid UTF-8")
        else:
            try:
                captions = _read_caption_lines(guard, path.with_suffix(".txt"))
            except (fsio.NotRegularFile, fsio.TooLarge, fsio.OutsideRoot) as err:  # counted
                load = _raiser(type(err), f"caption file {err.strerror}", err.filename)
        yield RawItem(
            id=item_id,
            source=printable(str(path)),
            load=load,
            captions=captions,
            split=rel.split("/", 1)[0] if has_split else None,
        )


def _list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, sorted by their parts."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append((rel_dir / name).as_posix())
    return sorted(found, key=lambda rel: rel.split("/"))


def _read_caption_lines(guard: InputGuard, path: Path) -> tuple[bytes, ...]:
    """Lines of a caption file; () when there is none. A link out of the root, a special or
    oversized file raises (NotRegularFile / TooLarge): its content must never reach a shard."""
    try:
        return tuple(guard.read(path, limits.MAX_CAPTION_FILE_BYTES).splitlines())
    except FileNotFoundError:
        return ()
