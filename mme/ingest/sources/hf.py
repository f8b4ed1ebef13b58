"""``source: hf``: a local Hugging Face ``datasets`` folder (``save_to_disk``) or parquet
file(s), read with pyarrow in batches."""

from __future__ import annotations

import errno
import json
import posixpath
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from mme import fsio
from mme.ingest.sources.common import (
    SPLITS,
    RawItem,
    _bytes_loader,
    _unique_ids,
)
from mme.ingest.sources.guard import InputGuard

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
    guard = InputGuard.at(path if Path(path).is_dir() else Path(path).parent)
    return _hf_items(parts, image_column, caption_column, guard)


def _hf_parts(path: Path) -> list[tuple[Path, str | None]]:
    """``(arrow or parquet file, split)`` in a deterministic order."""
    if path.is_file():
        return [(path, _split_of(path.name))]
    if (path / "dataset_dict.json").is_file():
        subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [(f, s.name if s.name in SPLITS else None) for s in subs for f, _ in _hf_parts(s)]
    if (path / "state.json").is_file():
        try:  # a plain file under a cap: a FIFO would hang, a huge one fill memory
            state = json.loads(fsio.read_regular(path / "state.json", 1 << 20))
            names = [d["filename"] for d in state.get("_data_files", [])]
        except (OSError, ValueError, RecursionError, AttributeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}/state.json is not a datasets state file ({err})") from None
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


def _hf_rows(
    parts: list[tuple[Path, str | None]], image_column: str, caption_column: str, guard: InputGuard
):
    """``(name, image bytes or None or the OSError that refused the file, captions, split,
    source)`` per row; a file that is a link out of the input, a FIFO or a device is one row
    (counted as skipped), never opened."""
    for file, split in parts:
        try:
            real = guard.regular(file)
        except OSError as err:
            yield file.name, err, [], split, str(file)
            continue
        for n_batch, batch in enumerate(_hf_batches(real)):
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
    parts: list[tuple[Path, str | None]], image_column: str, caption_column: str, guard: InputGuard
) -> Iterator[RawItem]:
    # Two passes so memory stays one batch: the ids need every name first (collisions).
    names = [r[0] for r in _hf_rows(parts, image_column, caption_column, guard)]
    ids = _unique_ids(names, lambda n: [posixpath.splitext(PurePosixPath(n).name)[0], n])
    rows = _hf_rows(parts, image_column, caption_column, guard)
    for (_, data, caps, split, source), item_id in zip(rows, ids, strict=True):
        yield RawItem(
            id=item_id,
            source=source,
            load=_bytes_loader(data, source),
            captions=tuple(str(c).encode("utf-8", "surrogateescape") for c in caps),
            split=split,
        )
