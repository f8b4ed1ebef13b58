"""WebDataset shard format of mme: writing (deterministic, atomic) and reading.

One sample per image. Members of a sample with key ``ID``:

- ``ID.png`` or ``ID.jpg``: the image bytes (RGB).
- ``ID.txt``: all captions of the image, UTF-8, one per line (captions never contain newlines).
- ``ID.json``: metadata, at least ``{"id", "source", "sha256", "width", "height"}``; later stages
  add keys (e.g. ``method``, ``epsilon``). A protected sample's metadata never holds the keys of
  :data:`PRIVATE_META` (which words are the trigger, which images carry noise): those live only in
  the private ``triggers.json`` (docs/threat-model.md).

Shards are ``OUT/{split}-%06d.tar``. Tars are byte-deterministic (sorted members, mtime 0, uid 0,
no user names) so that the same inputs give byte-identical shards, and each tar is written with
the one atomic-write helper (:mod:`mme.fsio`), so an interrupted run never leaves a tar that
looks complete.

Reading treats a shard as hostile: tars are opened uncompressed (a gzip bomb named ``.tar`` is
refused, not inflated), every member must be a regular file named ``KEY.EXT`` with a valid key,
and no member may exceed :data:`mme.limits.MAX_FILE_BYTES`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from mme import fsio, limits

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# metadata keys that locate or identify the protection: private (triggers.json) only. Sets made
# before this rule carried them in the public meta; publishing paths drop or refuse them.
PRIVATE_META = ("trigger_text", "trigger_ids", "trigger_word", "protected", "clean_sha256")


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without the keys of :data:`PRIVATE_META`, and ``source`` as a name, not a
    local path (sets made before that rule recorded the clean folder's path)."""
    public = {k: v for k, v in meta.items() if k not in PRIVATE_META}
    if isinstance(public.get("source"), str):
        public["source"] = PurePath(public["source"].replace("\\", "/")).name
    return public


def names_local_path(meta: dict[str, Any]) -> bool:
    """True when ``meta["source"]`` is a path rather than a name (see :func:`public_meta`)."""
    source = meta.get("source")
    return isinstance(source, str) and ("/" in source or "\\" in source)


IMAGE_EXTS = ("png", "jpg")


@dataclass
class Sample:
    """One image with all its captions, as stored in a shard."""

    id: str
    image_bytes: bytes
    image_ext: str  # "png" or "jpg"
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def image(self) -> np.ndarray:
        """Decoded image, (H, W, 3) uint8; :class:`BadImage` for bytes that are not an image,
        or one declaring more than :data:`mme.limits.MAX_PIXELS` pixels (checked before any
        pixel is decoded)."""
        try:
            with Image.open(io.BytesIO(self.image_bytes)) as im:
                w, h = im.size
                if w * h > limits.MAX_PIXELS:
                    raise BadImage(f"sample {self.id}: {w}x{h} pixels > {limits.MAX_PIXELS}")
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
            if isinstance(err, BadImage):
                raise
            raise BadImage(f"sample {self.id}: not a decodable image ({err})") from None


class BadImage(ValueError):
    """A sample whose image bytes cannot be decoded, or declare too many pixels."""


def safe_key(text: str) -> str:
    """Map any id (file name, URL) to a WebDataset-safe key: no dots, no slashes."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    if not key:
        raise ValueError(f"cannot derive a sample key from {text!r}")
    return key


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG of a (H, W, 3) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(
        buf, format="PNG", optimize=False, compress_level=6
    )
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(shard_dir: Path) -> str | None:
    """The dataset version of ``shard_dir`` (None without a ``manifest.json``): a sha256 over
    the shards its manifest records (split, name and sha256 of each tar), i.e. over the data
    alone. The rest of the manifest names folders (``config.out``, ``clean``), so hashing all of
    it gave one set two versions in two folders (DVC's ``data/...``, Prefect's ``runs/prefect``).
    Every stage logs it as ``data_manifest_sha256``; ``mme report`` and ``reevaluate`` key on it.
    A manifest whose records are malformed raises :class:`BadShard`."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        return None
    records = recorded_shards(load_manifest(shard_dir), path)
    return sha256_bytes(json.dumps(records, sort_keys=True).encode("ascii"))


def recorded_shards(manifest: dict[str, Any], path: Path) -> dict[str, list[list[str]]]:
    """``{split: [[name, sha256], ...]}`` of a manifest's ``splits`` (checked: hostile input)."""
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict):
        raise BadShard(f"{path}: splits is not an object")
    out: dict[str, list[list[str]]] = {}
    for split, record in splits.items():
        shards = record.get("shards", []) if isinstance(record, dict) else None
        if not isinstance(shards, list):
            raise BadShard(f"{path}: splits.{split}.shards is not a list")
        pairs = [[s.get("name"), s.get("sha256")] for s in shards if isinstance(s, dict)]
        if len(pairs) != len(shards) or not all(isinstance(v, str) for p in pairs for v in p):
            raise BadShard(f"{path}: splits.{split}.shards needs a name and sha256 per shard")
        out[str(split)] = pairs
    return out


def _sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    if not KEY_RE.match(sample.id):
        raise ValueError(f"sample id {sample.id!r} is not a valid WebDataset key ([A-Za-z0-9_-]+)")
    if sample.image_ext not in IMAGE_EXTS:
        raise ValueError(f"image extension {sample.image_ext!r} not in {IMAGE_EXTS}")
    if any("\n" in c or "\r" in c for c in sample.captions):
        raise ValueError(f"sample {sample.id}: captions must not contain newlines")
    meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return [
        (f"{sample.id}.{sample.image_ext}", sample.image_bytes),
        (f"{sample.id}.json", meta),
        (f"{sample.id}.txt", "\n".join(sample.captions).encode("utf-8")),
    ]


def write_tar_atomic(path: Path, members: Iterable[tuple[str, bytes]]) -> str:
    """Write a deterministic tar at ``path`` via a temporary name; return its sha256."""
    path = Path(path)
    with fsio.atomic_open(path) as raw:
        # PAX: names over USTAR's 100 bytes get an extended header (long file names); shorter
        # ones are written exactly as USTAR wrote them, so existing shards keep their bytes
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return sha256_file(path)


class ShardWriter:
    """Incremental writer of ``out_dir/{split}-%06d.tar`` (``maxcount`` samples per shard).

    ``close()`` returns one record per shard, ``{"name", "count", "sha256"}``, and removes stale
    shards of the same split from an earlier run, so the folder holds exactly what is listed.
    """

    def __init__(self, out_dir: Path, split: str, maxcount: int = 1000) -> None:
        self.out_dir, self.split, self.maxcount = Path(out_dir), split, maxcount
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self._batch: list[Sample] = []
        self.n_samples = self.n_captions = 0

    def write(self, sample: Sample) -> None:
        self._batch.append(sample)
        self.n_samples += 1
        self.n_captions += len(sample.captions)
        if len(self._batch) >= self.maxcount:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.records):06d}.tar"
        members = [m for s in self._batch for m in _sample_members(s)]
        sha = write_tar_atomic(self.out_dir / name, members)
        self.records.append({"name": name, "count": len(self._batch), "sha256": sha})
        self._batch.clear()

    def close(self) -> list[dict[str, Any]]:
        if self._batch:
            self._flush()
        keep = {r["name"] for r in self.records}
        for old in shard_paths(self.out_dir, self.split):
            if old.name not in keep:
                old.unlink()
        return self.records


def write_shards(
    out_dir: Path, split: str, samples: Iterable[Sample], maxcount: int = 1000
) -> list[dict[str, Any]]:
    """Write ``samples`` (in the given order) as ``out_dir/{split}-%06d.tar``; see ShardWriter."""
    writer = ShardWriter(out_dir, split, maxcount)
    for sample in samples:
        writer.write(sample)
    return writer.close()


def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    """Sorted shard files of one split."""
    return sorted(Path(shard_dir).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def brace_pattern(shard_dir: Path, split: str) -> str:
    """``DIR/split-{000000..000003}.tar`` for WebDataset / open_clip_train ``--train-data``."""
    paths = shard_paths(shard_dir, split)
    if not paths:
        raise FileNotFoundError(f"no {split}-*.tar shards in {shard_dir}")
    if len(paths) == 1:
        return str(paths[0])
    last = len(paths) - 1
    return str(Path(shard_dir) / f"{split}-{{000000..{last:06d}}}.tar")


def iter_samples(shard_dir: Path, split: str) -> Iterator[Sample]:
    """Read back the samples of one split, in shard order.

    Plain ``tarfile`` reading keeps this dependency-light; the shards are standard WebDataset tars
    (tests read them with ``webdataset`` too).
    """
    paths = shard_paths(shard_dir, split)
    if not paths:
        raise FileNotFoundError(f"no {split}-*.tar shards in {shard_dir}")
    for path in paths:
        yield from _iter_tar(path)


class BadShard(ValueError):
    """A shard that is not in mme's format (or was crafted): the message names the problem."""


def open_tar(path: Path, compression: str = "") -> tarfile.TarFile:
    """Open a tar for reading: uncompressed unless ``compression`` (``gz``, ``bz2``, ``xz``)
    is asked for explicitly; anything else is a :class:`BadShard`, never a guess. A FIFO or a
    device (behind a symlink or not) is refused before it is opened: it could hang or not end."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadShard(f"{path}: not a regular file")
        return tarfile.open(path, f"r:{compression}")
    except tarfile.ReadError as err:
        how = f"a {compression}-compressed" if compression else "an uncompressed"
        raise BadShard(f"{path}: not {how} tar ({err})") from None


def read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> bytes:
    """The bytes of one regular member, at most :data:`limits.MAX_FILE_BYTES`."""
    if info.size > limits.MAX_FILE_BYTES:
        raise BadShard(
            f"{path}: member {info.name!r} has {info.size} bytes (cap {limits.MAX_FILE_BYTES})"
        )
    f = tar.extractfile(info)
    data = f.read(limits.MAX_FILE_BYTES + 1) if f is not None else b""
    if len(data) > limits.MAX_FILE_BYTES:
        raise BadShard(
            f"{path}: member {info.name!r} is over the cap of {limits.MAX_FILE_BYTES} bytes"
        )
    return data


def split_member(name: str, path: Path) -> tuple[str, str]:
    """``(key, ext)`` of a member named ``KEY.EXT``; a key that is not ``[A-Za-z0-9_-]+`` (a
    path, ``..``, an absolute name, odd characters) is a :class:`BadShard`."""
    key, _, ext = name.partition(".")
    if not KEY_RE.match(key) or not ext or len(name) > limits.MAX_MEMBER_NAME:
        raise BadShard(f"{path}: member {name[:200]!r} is not KEY.EXT with a key of [A-Za-z0-9_-]")
    return key, ext


def _iter_tar(path: Path) -> Iterator[Sample]:
    current: dict[str, bytes] = {}
    key = None
    with open_tar(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member(info.name, path)
            if key is not None and k != key:
                yield _to_sample(key, current, path)
                current = {}
            key = k
            current[ext] = read_member(tar, info, path)
    if key is not None:
        yield _to_sample(key, current, path)


def _to_sample(key: str, members: dict[str, bytes], path: Path) -> Sample:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None or "txt" not in members:
        raise ValueError(f"{path}: sample {key} lacks an image or txt member: {sorted(members)}")
    try:
        captions = members["txt"].decode("utf-8").split("\n")
        meta = json.loads(members["json"]) if "json" in members else {}
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, JSON nested too deep
        raise BadShard(f"{path}: sample {key}: {str(err)[:200]}") from None
    if not isinstance(meta, dict):
        raise BadShard(f"{path}: sample {key}: metadata is not a JSON object")
    return Sample(id=key, image_bytes=members[ext], image_ext=ext, captions=captions, meta=meta)


def count_samples(shard_dir: Path, split: str) -> int:
    return sum(1 for _ in iter_samples(shard_dir, split))


def load_manifest(shard_dir: Path) -> dict[str, Any]:
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `mme prepare` (or `mme poison`) first")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang, /dev/zero never end
        raise BadShard(f"{path}: not a regular file")
    with open(path, "rb") as f:
        raw = f.read(limits.MAX_FILE_BYTES + 1)
    try:
        manifest = json.loads(raw) if len(raw) <= limits.MAX_FILE_BYTES else None
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise BadShard(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise BadShard(f"{path}: not a JSON object of at most {limits.MAX_FILE_BYTES} bytes")
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Kept for callers: :func:`mme.fsio.write_json`."""
    from mme import fsio

    fsio.write_json(path, obj)
