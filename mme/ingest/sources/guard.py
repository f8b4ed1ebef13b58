"""The one input guard of every source (folder, CSV, WebDataset, HF): what a reader may open.

A source has a root (the folder given, a CSV's ``image_root`` or its folder, a shard folder,
a ``datasets`` folder). Every path a reader opens is resolved (``..`` and every symlink on the
way followed) and must land inside the root, or inside the DVC cache of the repository that
holds the root (``.dvc/cache``, or its ``cache.dir``): a folder checked out with ``cache.type:
symlink`` is read, a link to ``/etc/passwd`` is not. Only regular files are read, under a byte
cap, without blocking (:func:`mme.fsio.read_regular` on the resolved path): a FIFO or device is
refused. Absolute paths named by the data (a CSV cell) are read only with an explicit flag
(``data.allow_absolute_paths``). Every refusal is an ``OSError`` that
:mod:`mme.ingest.hygiene` counts as a skip of the one item: ``outside_root`` for a path named
outside the root, ``not_regular_file`` for a link that leaves it, a FIFO or a device.
"""

from __future__ import annotations

import configparser
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mme import fsio


@dataclass(frozen=True)
class InputGuard:
    """The root of a source and the folders its files may resolve into."""

    root: Path
    allowed: tuple[Path, ...]
    allow_absolute: bool = False

    @classmethod
    def at(cls, root: Path | str, allow_absolute: bool = False) -> InputGuard:
        real = Path(root).resolve()
        return cls(Path(root), (real, *dvc_caches(real)), allow_absolute)

    def contains(self, real: Path) -> bool:
        return any(real == a or real.is_relative_to(a) for a in self.allowed)

    def resolve(self, path: Path | str, named_absolute: bool = False) -> Path:
        """``path`` with every link followed, if it stays inside (see the module doc);
        ``named_absolute``: an absolute path the data names, allowed only with the flag."""
        path = Path(path)
        real = path.resolve()
        if named_absolute:
            if not self.allow_absolute:
                raise fsio.OutsideRoot(
                    errno.EACCES,
                    "absolute path outside the input root (allow it with "
                    "data.allow_absolute_paths / --allow-absolute-paths)",
                    str(path),
                )
            return real
        if self.contains(real):
            return real
        if path.is_symlink() or any(p.is_symlink() for p in path.parents):
            raise fsio.NotRegularFile(errno.ELOOP, "a link that leaves the input root", str(path))
        raise fsio.OutsideRoot(errno.EACCES, "outside the input root", str(path))

    def read(self, path: Path | str, max_bytes: int, named_absolute: bool = False) -> bytes:
        """The bytes of a regular file at ``path`` (resolved and contained), under the cap."""
        return fsio.read_regular(self.resolve(path, named_absolute), max_bytes)

    def regular(self, path: Path | str) -> Path:
        """``path`` resolved, contained and a regular file (a tar, a parquet file) — checked
        before a library opens it, which could block on a FIFO or never end on a device."""
        real = self.resolve(path)
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise fsio.NotRegularFile(errno.EINVAL, "is not a regular file", str(path))
        return real


def dvc_caches(root: Path) -> list[Path]:
    """The DVC cache of the repository holding ``root`` (nearest ``.dvc/`` above it): its
    default ``.dvc/cache`` and the ``cache.dir`` of ``.dvc/config``, if set."""
    for folder in (root, *root.parents):
        dvc = folder / ".dvc"
        if not dvc.is_dir():
            continue
        caches = [(dvc / "cache").resolve()]
        config = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            config.read_string(fsio.read_regular(dvc / "config", 1 << 20).decode("utf-8"))
            if config.has_option("cache", "dir"):
                caches.append((dvc / config.get("cache", "dir")).resolve())
        except (OSError, UnicodeDecodeError, configparser.Error):
            pass  # no config, or one we cannot read: the default cache only
        return caches
    return []
