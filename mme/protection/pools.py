"""Process pools of ``mme poison``'s I/O: decoding clean images into the work store, encoding
protected PNGs. Each image is handled by the same function in a worker as in this process, so
the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from mme import imageops, shards

ENCODE_CHUNK = 64  # images per task: large enough to amortise the hand-over, small to balance


def _array_ref(arr: np.ndarray) -> str | np.ndarray:
    """What a worker process needs to read ``arr``: its file for a memmap, else the array."""
    if isinstance(arr, np.memmap) and arr.filename:
        arr.flush()  # workers read the file: pending writes must be on it
        return str(arr.filename)
    return np.asarray(arr)


def _open_ref(ref: str | np.ndarray) -> np.ndarray:
    return np.load(ref, mmap_mode="r") if isinstance(ref, str) else ref


def _decode_rows(job: tuple[Any, int, list[bytes]]) -> None:
    """Decode images to the working size into rows ``start:start + len(blobs)`` of the store."""
    ref, start, blobs = job
    clean = np.load(ref, mmap_mode="r+") if isinstance(ref, str) else ref
    size = clean.shape[-1]
    for k, blob in enumerate(blobs):
        clean[start + k] = imageops.to_working_resolution(blob, size)
    if isinstance(ref, str):
        clean.flush()


class PixelDecoder:
    """Decodes images into the clean memmap in chunks: in this process (``workers`` 1) or in a
    pool (0: one process per core), with a bounded number of chunks in flight. The same
    function decodes every image either way, so the store is the same."""

    def __init__(self, clean: np.ndarray, workers: int) -> None:
        self.clean, self.workers = clean, workers or os.cpu_count() or 1
        self.start, self.blobs, self.inflight = 0, [], []
        self.pool = ProcessPoolExecutor(self.workers) if self.workers > 1 else None
        self.ref = _array_ref(clean) if self.pool else clean

    def add(self, i: int, blob: bytes) -> None:
        if not self.blobs:
            self.start = i
        self.blobs.append(blob)
        if len(self.blobs) == ENCODE_CHUNK:
            self._submit()

    def _submit(self) -> None:
        job = (self.ref, self.start, self.blobs)
        self.blobs = []
        if self.pool is None:
            return _decode_rows(job)
        self.inflight.append(self.pool.submit(_decode_rows, job))
        if len(self.inflight) > 2 * self.workers:  # bound the bytes waiting in memory
            self.inflight.pop(0).result()

    def __enter__(self) -> PixelDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.blobs and exc[0] is None:
            self._submit()
        for f in self.inflight:
            if exc[0] is None:
                f.result()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.clean.flush()


def _encode_chunk(job: tuple[Any, Any, int, int]) -> list[bytes]:
    """PNGs of protected images ``start:stop`` (clean + noise), in order."""
    clean_ref, noise_ref, start, stop = job
    clean, noise = _open_ref(clean_ref), _open_ref(noise_ref)
    return [
        shards.encode_png(imageops.apply_noise(clean[i], noise[i]).transpose(1, 2, 0))
        for i in range(start, stop)
    ]


def protected_pngs(clean: np.ndarray, noise: np.ndarray, workers: int = 0) -> Iterator[bytes]:
    """PNG bytes of ``clip(clean + noise)`` for every row, in row order.

    PNG encoding is the slow part of writing a protected set; ``workers`` processes (0: one per
    core; 1: in this process) encode chunks of rows in parallel. Each image is encoded by the same
    function either way, so the shards are byte-identical to a single-process run.
    """
    n = len(clean)
    workers = workers or os.cpu_count() or 1
    jobs = [(0, 0, s, min(s + ENCODE_CHUNK, n)) for s in range(0, n, ENCODE_CHUNK)]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield from _encode_chunk((clean, noise, job[2], job[3]))
        return
    refs = _array_ref(clean), _array_ref(noise)
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        for pngs in pool.map(_encode_chunk, [(*refs, s, e) for _, _, s, e in jobs]):
            yield from pngs
