"""Durable file writes: the one atomic-write helper every module uses.

A file is written under a temporary name that is unique per process and call (so two writers
never share it), flushed and fsynced, then renamed over the target, and the directory is fsynced
so the rename itself survives a crash. Readers see the old file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (create / rename / unlink) in ``path``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """``.<name>.<pid>.<random>.partial`` beside ``path``: unique per process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` durably,
    on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with open(tmp, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any) -> None:
    """Stable JSON (sorted keys, indent 2, UTF-8, trailing newline): same object, same bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- reading safely


class NotRegularFile(OSError):
    """A symlink, FIFO, device or directory where a plain file was expected."""


class TooLarge(OSError):
    """A file over the byte cap of its kind."""


class OutsideRoot(OSError):
    """A path that input data names outside its source's root (mme.ingest.sources.guard)."""


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a plain file (not a symlink) of at most ``max_bytes``.

    ``O_NOFOLLOW`` refuses a symlink as the last component and ``O_NONBLOCK`` keeps a FIFO from
    hanging the open; the type and size are checked on the open descriptor, and reading stops at
    ``max_bytes + 1`` so a file that grows (or lies about its size, as /proc files do) is bounded.
    """
    with _open_regular(path) as f:
        st = os.fstat(f.fileno())
        if st.st_size > max_bytes:
            raise TooLarge(errno.EFBIG, f"{st.st_size} bytes > cap {max_bytes}", str(path))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(errno.EFBIG, f"more than the cap of {max_bytes} bytes", str(path))
    return data


def read_head(path: Path | str, n: int) -> bytes:
    """The first ``n`` bytes of ``path`` if it is a plain file (not a symlink, FIFO, device)."""
    with _open_regular(path) as f:
        return f.read(n)


def _open_regular(path: Path | str) -> IO[bytes]:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise NotRegularFile(errno.ELOOP, "is a symlink (not followed)", str(path)) from None
        raise
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise NotRegularFile(errno.EINVAL, "is not a regular file", str(path))
    return f


# ------------------------------------------------------------------------------ output paths


class UnsafePath(ValueError):
    """An output path that would land outside its destination or clobber an input."""


def resolve_under(dest: Path | str, rel: str) -> Path:
    """``dest / rel``, refusing a ``rel`` that is absolute, has ``..`` or leaves ``dest``."""
    dest = Path(dest).resolve()
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\x00" in rel:
        raise UnsafePath(f"output name {rel!r} is not a plain relative name")
    target = (dest / rel).resolve()
    if not target.is_relative_to(dest) or target == dest:
        raise UnsafePath(f"output name {rel!r} resolves outside {dest}")
    return target


def check_disjoint(
    out: Path | str, inputs: dict[str, Path | str | None], flag: str = "--out"
) -> None:
    """Refuse an output folder that equals, contains or sits inside one of ``inputs``
    (``{what: path}``; None entries are ignored): replacing it would destroy the input."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        i = Path(path).resolve()
        if o == i:
            raise UnsafePath(f"{flag} {out} is the {what} {path}")
        if i.is_relative_to(o):
            raise UnsafePath(f"{flag} {out} contains the {what} {path}")
        if o.is_relative_to(i):
            raise UnsafePath(f"{flag} {out} is inside the {what} {path}")


# ------------------------------------------------------------------------- folder ownership

OWNER = ".mme-owner"  # the marker naming the mme command (and run) that made a folder: mme.guard


# ---------------------------------------------------------------------------------- locking


class FolderBusy(RuntimeError):
    """Another process holds the lock of an output folder."""


@contextlib.contextmanager
def locked(folder: Path | str) -> Iterator[Path]:
    """Hold an exclusive lock on output ``folder`` for the block; a second writer fails at once.

    The lock file ``.<name>.lock`` sits beside the folder (not in it: a public folder stays
    free of it, and it survives the folder being replaced). It is never deleted: removing a
    lock file that another process just opened would let a third one take a second lock.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(f".{folder.name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"{folder} is being written by another process (lock {path}); wait for it to end"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        os.close(fd)  # releases the lock


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing what is there (the caller has
    checked it may). ``target`` is gone only between two renames; both are fsynced."""
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def staging_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to build its next version in. Called with
    ``target``'s lock held, so earlier staging folders of it are left by dead runs: removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
    path = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    path.mkdir()
    return path
