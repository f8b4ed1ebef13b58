"""What every source reader shares: :class:`RawItem`, unique WebDataset-safe ids, and the
loaders of items that cannot be read (each a counted skip in :mod:`mme.ingest.hygiene`)."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mme import fsio, imageops, limits
from mme.ingest.hygiene import Skip
from mme.ingest.sources.guard import InputGuard
from mme.shards import safe_key, sha256_bytes

IMAGE_SUFFIXES = imageops.IMAGE_SUFFIXES


# Member extensions that hold an image in a WebDataset sample, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


SPLITS = ("train", "test")


@dataclass(frozen=True)
class RawItem:
    """One image of a source, before any hygiene."""

    id: str  # WebDataset-safe key, unique within the source
    source: str  # where it came from (path as given, or ``shard.tar:member``), for the manifest
    load: Callable[[], bytes]  # reads the image bytes; raises FileNotFoundError / OSError
    captions: tuple[bytes, ...]  # raw caption bytes in source order
    split: str | None  # "train" / "test" when the source defines the split


# --------------------------------------------------------------------------------------- ids


def _unique_ids(names: Sequence[str], variants: Callable[[str], list[str]]) -> list[str]:
    """One key per name: the first variant if no other name shares it, else a longer variant.

    ``variants(name)`` lists candidate texts, shortest first. A short hash of the name is the last
    resort, so the result is always unique and depends only on the list of names and its order.
    """
    first = [_key(variants(n)[0]) for n in names]
    counts = Counter(first)
    used = {k for k in first if counts[k] == 1}
    ids = []
    for name, key in zip(names, first, strict=True):
        if counts[key] > 1:
            longer = [_key(v) for v in variants(name)[1:]]
            longer.append(f"{key}_{_hash(name)[:8]}")
            key = next((k for k in longer if k not in used), None) or _numbered(longer[-1], used)
            used.add(key)
        ids.append(key)
    return ids


MAX_KEY = 200  # characters of an id: <id>.png must stay a valid file name (255 bytes)


def _key(text: str) -> str:
    """``safe_key``, or a hash-based key for names with no ASCII letter or digit (e.g. CJK);
    a longer one is cut and made unique by a hash of the whole name."""
    try:
        key = safe_key(text)
    except ValueError:
        return f"id_{_hash(text)[:16]}"
    return key if len(key) <= MAX_KEY else f"{key[: MAX_KEY - 17]}_{_hash(text)[:16]}"


def _hash(text: str) -> str:
    return sha256_bytes(text.encode("utf-8", "surrogateescape"))


def _numbered(key: str, used: set[str]) -> str:
    n = 1
    while f"{key}_{n}" in used:
        n += 1
    return f"{key}_{n}"


def _is_utf8(text: str) -> bool:
    """False for a name decoded with ``surrogateescape`` from bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xNN``: safe in JSON, logs and the manifest."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _skipper(reason: str, detail: str) -> Callable[[], bytes]:
    def load() -> bytes:
        raise Skip(reason, detail)

    return load


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _missing_loader(name: str, why: str) -> Callable[[], bytes]:
    def load() -> bytes:
        raise FileNotFoundError(errno.ENOENT, why, name)

    return load


def _raiser(kind: type[OSError], why: str, name: str) -> Callable[[], bytes]:
    def load() -> bytes:
        raise kind(errno.EINVAL, why, name)

    return load


def _bytes_loader(data: bytes | OSError | None, source: str) -> Callable[[], bytes]:
    def load() -> bytes:
        if isinstance(data, OSError):  # the file that held the row was refused
            raise data
        if not isinstance(data, bytes | bytearray):
            raise FileNotFoundError(errno.ENOENT, "row has no image bytes", source)
        return bytes(data)

    return load


def _file_loader(
    name: str, candidates: list[Path], guard: InputGuard, absolute: Path | None = None
) -> Callable[[], bytes]:
    """Read the first candidate that exists, through ``guard`` (resolved inside the source's
    root, a regular file under the byte cap); ``absolute``: the candidate the data names as an
    absolute path (read only when the guard allows absolute paths)."""

    def load() -> bytes:
        outside: OSError | None = None
        for candidate in candidates:
            try:
                named = absolute is not None and candidate == absolute
                return guard.read(candidate, limits.MAX_FILE_BYTES, named_absolute=named)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except fsio.OutsideRoot as err:  # another candidate may still be inside
                outside = err if candidate.exists() else outside
        if outside is not None:
            raise outside
        tried = ", ".join(printable(str(c)) for c in candidates)
        raise FileNotFoundError(errno.ENOENT, f"image not found (tried {tried})", printable(name))

    return load
