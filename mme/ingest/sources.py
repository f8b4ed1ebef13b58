"""Readers for the non-synthetic data sources: CSV split files, image folders, WebDataset shards.

Each reader yields :class:`RawItem` s, one per image, in a deterministic order. Readers never
modify their input and never judge it: image bytes are read lazily by ``RawItem.load`` and captions
stay raw bytes, so that every problem (missing file, corrupt image, bad UTF-8, no caption) reaches
:mod:`mme.ingest.hygiene` and is counted there, rather than being silently dropped here.

Every input is treated as hostile: files are read only when they are plain files (no symlink,
FIFO or device; see :func:`mme.fsio.read_regular`) under a byte cap (:mod:`mme.limits`), tars are
opened uncompressed unless their name asks otherwise (``.tar.gz``, ``.tgz``), and a name or cell
that is not valid UTF-8 becomes an item whose loader raises ``Skip("invalid_name")``. Each such
problem is a counted skip of one item, never a crash, a hang or a read outside the input.

Item ids are WebDataset-safe keys (:func:`mme.shards.safe_key`) derived from the image name and
unique within one source. When two names map to the same key, the colliding ones get a longer
variant (the path, then the extension, then a short hash), so the ids of all other items do not
depend on which collisions happen to exist.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

from braceexpand import braceexpand

from mme import fsio, limits
from mme.ingest.hygiene import Skip
from mme.shards import open_tar, safe_key, sha256_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
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


def _key(text: str) -> str:
    """``safe_key``, or a hash-based key for names with no ASCII letter or digit (e.g. CJK)."""
    try:
        return safe_key(text)
    except ValueError:
        return f"id_{_hash(text)[:16]}"


def _hash(text: str) -> str:
    return sha256_bytes(text.encode("utf-8", "surrogateescape"))


def _numbered(key: str, used: set[str]) -> str:
    n = 1
    while f"{key}_{n}" in used:
        n += 1
    return f"{key}_{n}"


# --------------------------------------------------------------------------------------- csv


def iter_csv(
    path: Path | str,
    *,
    image_column: str = "images",
    caption_column: str = "caption",
    delimiter: str = ",",
    image_root: Path | str | None = None,
    split: str | None = None,
) -> Iterator[RawItem]:
    """Images of a caption CSV (one row per caption), all captions of an image together.

    Rows are grouped by the image cell in first-seen order, whether or not they are adjacent.
    Relative image paths are resolved against ``image_root`` (default: the CSV's folder); paths that
    do not exist there, and absolute paths that do not exist, are looked up under ``image_root`` by
    their ever shorter suffixes (``/data/flickr/Images/x.jpg`` -> ``root/data/flickr/Images/x.jpg``,
    ..., ``root/Images/x.jpg``, ``root/x.jpg``), so split files written on another machine work.
    """
    path = Path(path)
    # Read and validate now, not on the first next(): a bad column fails before any work starts.
    groups = _read_csv_groups(path, image_column, caption_column, delimiter)
    root = Path(image_root) if image_root is not None else path.parent
    return _csv_items(groups, root, split)


def _csv_items(groups: dict[str, list[bytes]], root: Path, split: str | None) -> Iterator[RawItem]:
    cells = list(groups)
    ids = _unique_ids(cells, _csv_id_variants)
    for cell, item_id in zip(cells, ids, strict=True):
        load = _file_loader(cell, _path_candidates(cell, root), root)
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


def _path_candidates(cell: str, root: Path) -> list[Path]:
    is_abs, parts = _split_path(cell)
    first = [Path(cell)] if is_abs else [root.joinpath(*parts)]
    suffixes = [root.joinpath(*parts[i:]) for i in range(0 if is_abs else 1, len(parts))]
    return list(dict.fromkeys(first + suffixes))  # dedupe, keep order


def _file_loader(name: str, candidates: list[Path], root: Path | None) -> Callable[[], bytes]:
    """Read the first candidate that exists: a plain file under the byte cap, and, for one
    under ``root``, still under ``root`` once every symlinked folder on its way is resolved."""

    def load() -> bytes:
        for candidate in candidates:
            try:
                if root is not None and candidate.is_relative_to(root):
                    if not candidate.resolve().is_relative_to(root.resolve()):
                        raise fsio.NotRegularFile(
                            errno.ELOOP, "leaves the input root", str(candidate)
                        )
                return fsio.read_regular(candidate, limits.MAX_FILE_BYTES)
            except (FileNotFoundError, NotADirectoryError):
                continue
        tried = ", ".join(printable(str(c)) for c in candidates)
        raise FileNotFoundError(errno.ENOENT, f"image not found (tried {tried})", printable(name))

    return load


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
    ids = _unique_ids(rels, lambda rel: [posixpath.splitext(rel)[0], rel])
    for rel, item_id in zip(rels, ids, strict=True):
        path = root / rel
        load, captions = _file_loader(str(path), [path], None), ()
        if not _is_utf8(rel):
            load = _skipper("invalid_name", "the file name is not valid UTF-8")
        else:
            try:
                captions = _read_caption_lines(path.with_suffix(".txt"))
            except (fsio.NotRegularFile, fsio.TooLarge) as err:  # counted via the image's load
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


def _read_caption_lines(path: Path) -> tuple[bytes, ...]:
    """Lines of a caption file; () when there is none. A symlinked, special or oversized file
    raises (NotRegularFile / TooLarge): its content must never reach a shard."""
    try:
        return tuple(fsio.read_regular(path, limits.MAX_CAPTION_FILE_BYTES).splitlines())
    except FileNotFoundError:
        return ()


def _raiser(kind: type[OSError], why: str, name: str) -> Callable[[], bytes]:
    def load() -> bytes:
        raise kind(errno.EINVAL, why, name)

    return load


# ------------------------------------------------------------------------------- webdataset


def iter_webdataset(path_or_pattern: Path | str) -> Iterator[RawItem]:
    """Samples of existing WebDataset shards (e.g. img2dataset output).

    ``path_or_pattern`` is a directory (all ``*.tar`` in it, sorted), one tar, or a brace pattern
    (``shards/{00000..00009}.tar``). Captions come from the ``txt`` member (one per line), else
    from the ``caption`` field of the ``json`` member. The split is ``train`` / ``test`` when the
    shard's file name starts with it, else None.
    """
    return _wds_items(_expand_shards(path_or_pattern))  # missing shards fail at call time


def _wds_items(shards: list[Path]) -> Iterator[RawItem]:
    seen: set[str] = set()
    for shard in shards:
        split = next((s for s in SPLITS if shard.name.startswith(s)), None)
        for key, members in _tar_samples(shard):
            item_id = _unique_streaming_id(key, shard, seen)
            yield _wds_item(item_id, key, shard, members, split)


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
    except ValueError:  # includes invalid UTF-8; the item then has no caption and is counted
        return ()
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if not isinstance(caption, str):
        return ()
    # surrogatepass: a lone surrogate escaped in the JSON becomes invalid UTF-8; hygiene drops it.
    return (caption.encode("utf-8", "surrogatepass"),)


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _missing_loader(name: str, why: str) -> Callable[[], bytes]:
    def load() -> bytes:
        raise FileNotFoundError(errno.ENOENT, why, name)

    return load


# -------------------------------------------------------------------------- hugging face


HF_IMAGE_COLUMNS = ("image", "img", "jpg", "png")
HF_CAPTION_COLUMNS = ("text", "caption", "captions", "sentences", "txt")


def iter_hf(
    path: Path | str, *, image_column: str = "image", caption_column: str = "text"
) -> Iterator[RawItem]:
    """Rows of a local Hugging Face ``datasets`` folder (``save_to_disk``) or parquet file(s).

    ``path`` is a ``Dataset`` folder (``state.json`` + ``*.arrow``), a ``DatasetDict`` folder (one
    subfolder per split; ``train``/``test`` give the split), a ``.parquet`` file or a folder of
    them (a file name starting with ``train``/``test`` gives the split). The image column holds
    ``datasets.Image`` structs (``{bytes, path}``) or raw bytes; the caption column a string or a
    list of strings. When the named column is absent, the usual names are tried
    (:data:`HF_IMAGE_COLUMNS`, :data:`HF_CAPTION_COLUMNS`). Read with pyarrow, batch by batch;
    ``datasets`` itself is not needed.
    """
    parts = _hf_parts(Path(path))
    if not parts:
        raise FileNotFoundError(errno.ENOENT, "no save_to_disk folder or parquet files", str(path))
    return _hf_items(parts, image_column, caption_column)


def _hf_parts(path: Path) -> list[tuple[Path, str | None]]:
    """``(arrow or parquet file, split)`` in a deterministic order."""
    if path.is_file():
        return [(path, _split_of(path.name))]
    if (path / "dataset_dict.json").is_file():
        subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [(f, s.name if s.name in SPLITS else None) for s in subs for f, _ in _hf_parts(s)]
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = [d["filename"] for d in state.get("_data_files", [])]
        for name in names:  # hostile state.json: names must stay inside the folder
            if PurePosixPath(name).name != name:
                raise ValueError(f"{path}/state.json names a file outside the folder: {name!r}")
        return [(path / n, None) for n in names]
    return [(p, _split_of(p.name)) for p in sorted(path.rglob("*.parquet"))]


def _split_of(name: str) -> str | None:
    return next((s for s in SPLITS if name.startswith(s)), None)


def _hf_batches(file: Path) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.suffix == ".parquet":
        yield from pq.ParquetFile(file).iter_batches(batch_size=256)
        return
    with pa.memory_map(str(file)) as source:
        yield from pa.ipc.open_stream(source)


def _pick(names: list[str], wanted: str, usual: tuple[str, ...], what: str, file: Path) -> str:
    found = next((c for c in (wanted, *usual) if c in names), None)
    if found is None:
        raise ValueError(f"{file}: no {what} column {wanted!r} (columns: {', '.join(names)})")
    return found


def _hf_rows(parts: list[tuple[Path, str | None]], image_column: str, caption_column: str):
    """``(name, image bytes or None, captions, split, source)`` per row."""
    for file, split in parts:
        for n_batch, batch in enumerate(_hf_batches(file)):
            names = batch.schema.names
            img_col = _pick(names, image_column, HF_IMAGE_COLUMNS, "image", file)
            cap_col = _pick(names, caption_column, HF_CAPTION_COLUMNS, "caption", file)
            images, captions = batch.column(img_col).to_pylist(), batch.column(cap_col).to_pylist()
            for i, (image, caps) in enumerate(zip(images, captions, strict=True)):
                data, name = (
                    (image.get("bytes"), image.get("path"))
                    if isinstance(image, dict)
                    else (image, None)
                )
                caps = [caps] if isinstance(caps, str) else [c for c in caps or [] if c is not None]
                row = f"{file.stem}-{n_batch:05d}-{i:05d}"
                yield name or row, data, caps, split, f"{file}:{row}"


def _hf_items(
    parts: list[tuple[Path, str | None]], image_column: str, caption_column: str
) -> Iterator[RawItem]:
    # Two passes so memory stays one batch: the ids need every name first (collisions).
    names = [r[0] for r in _hf_rows(parts, image_column, caption_column)]
    ids = _unique_ids(names, lambda n: [posixpath.splitext(PurePosixPath(n).name)[0], n])
    rows = _hf_rows(parts, image_column, caption_column)
    for (_, data, caps, split, source), item_id in zip(rows, ids, strict=True):
        yield RawItem(
            id=item_id,
            source=source,
            load=_bytes_loader(data, source),
            captions=tuple(str(c).encode("utf-8", "surrogateescape") for c in caps),
            split=split,
        )


def _bytes_loader(data: bytes | None, source: str) -> Callable[[], bytes]:
    def load() -> bytes:
        if not isinstance(data, bytes | bytearray):
            raise FileNotFoundError(errno.ENOENT, "row has no image bytes", source)
        return bytes(data)

    return load
