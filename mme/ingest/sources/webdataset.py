"""``source: webdataset``: existing shards (a folder, a file, or a brace pattern), streamed
member by member."""

from __future__ import annotations

import errno
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path

from braceexpand import braceexpand

from mme import limits
from mme.ingest.sources.common import (
    SPLITS,
    WDS_IMAGE_EXTS,
    RawItem,
    _constant,
    _is_utf8,
    _key,
    _missing_loader,
    _numbered,
    _raiser,
    _skipper,
    printable,
)
from mme.ingest.sources.guard import InputGuard
from mme.shards import open_tar

# ------------------------------------------------------------------------------- webdataset


def iter_webdataset(path_or_pattern: Path | str) -> Iterator[RawItem]:
    """Samples of existing WebDataset shards (e.g. img2dataset output).

    ``path_or_pattern`` is a directory (all ``*.tar`` in it, sorted), one tar, or a brace pattern
    (``shards/{00000..00009}.tar``). Captions come from the ``txt`` member (one per line), else
    from the ``caption`` field of the ``json`` member. The split is ``train`` / ``test`` when the
    shard's file name starts with it, else None.
    """
    shards = _expand_shards(path_or_pattern)  # missing shards fail at call time
    text = str(path_or_pattern)
    # the root: the folder given, else the one folder that holds every shard of the pattern
    parents = [s.parent for s in shards]
    root = Path(text) if Path(text).is_dir() else Path(os.path.commonpath(parents))
    return _wds_items(shards, InputGuard.at(root))


def _wds_items(shards: list[Path], guard: InputGuard) -> Iterator[RawItem]:
    seen: set[str] = set()
    for shard in shards:
        split = next((s for s in SPLITS if shard.name.startswith(s)), None)
        try:  # a link out of the input, a FIFO, a device: one counted skip, never opened
            real = guard.regular(shard)
        except OSError as err:
            yield _broken_shard(shard, err, seen, split)
            continue
        try:
            for key, members in _tar_samples(real):
                item_id = _unique_streaming_id(key, shard, seen)
                yield _wds_item(item_id, key, shard, members, split)
        except (tarfile.TarError, EOFError, OSError) as err:  # truncated, or sizes that lie
            yield _broken_shard(shard, err, seen, split)  # the rest of it: one counted skip


def _broken_shard(shard: Path, err: Exception, seen: set[str], split: str | None) -> RawItem:
    """The unreadable (rest of a) shard as one item whose load raises: counted by hygiene."""
    why = f"shard unreadable from here on: {err}"
    kind = type(err) if isinstance(err, OSError) else OSError
    item_id = _unique_streaming_id(f"{shard.name}_broken", shard, seen)
    return RawItem(item_id, printable(str(shard)), _raiser(kind, why, str(shard)), (), split)


def _expand_shards(path_or_pattern: Path | str) -> list[Path]:
    text = str(path_or_pattern)
    if Path(text).is_dir():
        shards = sorted(Path(text).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(errno.ENOENT, "no *.tar shards in folder", text)
        return shards
    shards = [Path(p) for p in braceexpand(text)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(errno.ENOENT, f"shards not found: {missing[:3]}{more}", text)
    return shards


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """``(key, {ext: (member name, bytes)})`` per sample, streaming, WebDataset-style.

    The key is the member's folder plus its base name up to the first dot; consecutive members with
    the same key form one sample (as in ``webdataset``), so only one sample is held in memory.
    """
    key, members = None, {}
    with open_tar(shard, _compression(shard)) as tar:
        for info in tar:
            folder, base = posixpath.split(info.name)
            stem, dot, ext = base.partition(".")
            if not info.isfile() or not dot or not stem:
                continue  # folders, links, and extension-less or hidden files are not members
            k = posixpath.join(folder, stem)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[ext.lower()] = (info.name, _member_bytes(tar, info))
    if key is not None:
        yield key, members


def _compression(shard: Path) -> str:
    """A compressed tar only when its name says so; ``.tar`` is read uncompressed."""
    name = shard.name.lower()
    return "gz" if name.endswith((".tar.gz", ".tgz")) else ""


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | None:
    """The member's bytes, or None when it is over the cap (the item is then skipped)."""
    if info.size > limits.MAX_FILE_BYTES:
        return None
    f = tar.extractfile(info)
    return f.read(limits.MAX_FILE_BYTES + 1) if f is not None else b""


def _unique_streaming_id(key: str, shard: Path, seen: set[str]) -> str:
    # Keys are unique across shards in img2dataset output; if not, qualify by the shard's name.
    item_id = _key(key)
    if item_id in seen:
        item_id = _key(f"{shard.stem}_{key}")
        if item_id in seen:
            item_id = _numbered(item_id, seen)
    seen.add(item_id)
    return item_id


def _wds_item(
    item_id: str, key: str, shard: Path, members: dict[str, tuple[str, bytes]], split: str | None
) -> RawItem:
    ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    if ext is None:
        source = printable(f"{shard}:{key}")
        load = _missing_loader(source, f"sample has no image member ({', '.join(sorted(members))})")
    else:
        name, data = members[ext]
        source, load = printable(f"{shard}:{name}"), _constant(data)
    big = [n for n, d in members.values() if d is None or len(d) > limits.MAX_FILE_BYTES]
    if big:
        load = _skipper(
            "too_large", f"member {printable(big[0])} is over {limits.MAX_FILE_BYTES} bytes"
        )
        return RawItem(item_id, source, load, (), split)
    if not _is_utf8(key):
        return RawItem(
            item_id, source, _skipper("invalid_name", "member name is not UTF-8"), (), split
        )
    return RawItem(item_id, source, load, _wds_captions(members), split)


def _wds_captions(members: dict[str, tuple[str, bytes]]) -> tuple[bytes, ...]:
    if "txt" in members:
        return tuple(members["txt"][1].splitlines())
    if "json" not in members:
        return ()
    try:
        meta = json.loads(members["json"][1])
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, or nested too deep: no caption
        return ()
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if not isinstance(caption, str):
        return ()
    # surrogatepass: a lone surrogate escaped in the JSON becomes invalid UTF-8; hygiene drops it.
    return (caption.encode("utf-8", "surrogatepass"),)
