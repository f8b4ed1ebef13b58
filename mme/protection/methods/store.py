"""On-disk store of the pairs being protected: clean pixels, noise, caption tokens, triggers.

Host memory stays flat in the dataset size: clean pixels ``(N, 3, S, S)`` uint8 and the noise
``(N, 3, S, S)`` int8 (pixel units) are memory-mapped ``.npy`` files; only batches are read. The
noise has two buffers: a round reads ``current`` and writes ``next``, so the checkpoint taken at
the end of a round always points to a complete, consistent noise file (an interrupted round
leaves the previous one untouched).

On a GPU with room to spare, :meth:`PairStore.cache_on` also keeps the clean pixels and the
current noise on the device (uint8/int8, refreshed at every :meth:`swap`): batches are then
gathered there, with no host gather or copy per step. Otherwise host batches go through pinned
memory with a non-blocking copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mme.protection.methods.triggers import insert_trigger


@dataclass
class PairStore:
    clean: np.ndarray  # (N, 3, S, S) uint8 memmap
    noise: list[np.ndarray]  # two (N, 3, S, S) int memmaps, pixel units
    current: int  # index of the noise buffer that holds the latest complete noise
    cap_tokens: np.ndarray | torch.Tensor  # (Ncap, L) int32 memmap: every caption's tokens
    cap_offsets: torch.Tensor  # (N + 1,) long: captions of image i are rows off[i]:off[i+1]
    triggers: torch.Tensor  # (N, k) long
    protect: torch.Tensor  # (N,) bool
    eot_id: int
    cached: dict[str, torch.Tensor] = field(default_factory=dict)  # device copies, see cache_on
    # trigger_position "random": each image's trigger goes before word trigger_word[i] (N,) of
    # every caption of it, which is token column trigger_col[row] (Ncap,) of caption row ``row``;
    # None: right after the start token (column 1), the paper's layout
    trigger_word: torch.Tensor | None = None
    trigger_col: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.clean.shape[0]

    @staticmethod
    def open_arrays(work: Path, n: int, size: int, dtype: np.dtype) -> tuple:
        """Create (or reopen, for ``--resume``) the memmaps in ``work``."""
        shape = (n, 3, size, size)

        def mm(name: str, dt: np.dtype) -> np.ndarray:
            path = work / name
            if path.exists():
                arr = np.load(path, mmap_mode="r+")
                if arr.shape == shape and arr.dtype == dt:
                    return arr
            return np.lib.format.open_memmap(path, mode="w+", dtype=dt, shape=shape)

        return mm("clean_u8.npy", np.dtype(np.uint8)), [mm(f"noise_{i}.npy", dtype) for i in (0, 1)]

    def images(self, idx: torch.Tensor, device: torch.device, noisy: bool = True) -> torch.Tensor:
        """Batch ``(B, 3, S, S)`` in [0, 1] on ``device``: clean + current noise (or clean)."""
        x = self.clean_batch(idx, device)
        if noisy:
            x = (x + self.noise_batch(idx, device)).clamp_(0.0, 1.0)
        return x

    def clean_batch(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if "clean" in self.cached:
            return _take(self.cached["clean"], idx, device)
        return _gather(self.clean, idx, device)

    def noise_batch(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if "noise" in self.cached:
            return _take(self.cached["noise"], idx, device)
        return _gather(self.noise[self.current], idx, device)

    def device_bytes(self) -> int:
        """Memory :meth:`cache_on` needs: clean pixels + one noise buffer."""
        return int(self.clean.nbytes + self.noise[0].nbytes)

    def cache_on(self, device: torch.device) -> None:
        """Keep the clean pixels and the current noise on ``device`` (see module docstring)."""
        self.cached = {"clean": torch.from_numpy(np.asarray(self.clean)).to(device)}
        self._cache_noise()

    def _cache_noise(self) -> None:
        if self.cached:
            noise = torch.from_numpy(np.asarray(self.noise[self.current]))
            self.cached["noise"] = noise.to(self.cached["clean"].device)

    def write_noise(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Store ``delta`` ([0, 1] units) for images ``idx`` into the *next* buffer."""
        buf = self.noise[1 - self.current]
        px = (delta.float() * 255.0).round_().to("cpu", torch.int16).numpy().astype(buf.dtype)
        buf[idx.numpy()] = px

    def begin_round(self) -> None:
        """Start the next buffer from the current noise (rows not updated keep their value)."""
        self.noise[1 - self.current][:] = self.noise[self.current]

    def swap(self) -> None:
        self.noise[1 - self.current].flush()
        self.current = 1 - self.current
        self._cache_noise()

    def captions(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random caption per image: tokens (B, L)."""
        return self.pick_captions(idx, gen)[0]

    def pick_captions(
        self, idx: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One random caption per image: tokens (B, L) and its trigger columns (B,) (None when
        every trigger follows the start token)."""
        start, count = self.cap_offsets[idx], self.cap_offsets[idx + 1] - self.cap_offsets[idx]
        pick = start + (torch.rand(len(idx), generator=gen) * count).long()
        cols = None if self.trigger_col is None else self.trigger_col[pick].long()
        if isinstance(self.cap_tokens, torch.Tensor):
            return self.cap_tokens[pick].long(), cols
        return torch.from_numpy(np.asarray(self.cap_tokens[pick.numpy()], dtype=np.int64)), cols

    def texts(
        self,
        idx: torch.Tensor,
        tokens: torch.Tensor,
        with_trigger: bool,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Caption tokens with each protected image's trigger inserted at column ``cols`` (B,)
        (default: after the start token): (B, L)."""
        if not with_trigger:
            return tokens
        triggered = insert_trigger(tokens, self.triggers[idx], self.eot_id, cols)
        return torch.where(self.protect[idx][:, None], triggered, tokens)


def _gather(arr: np.ndarray, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of a pixel-unit memmap, in ``idx`` order, as floats /255 on ``device``."""
    rows = np.sort(idx.numpy())  # sorted reads are sequential on disk
    order = torch.from_numpy(np.searchsorted(rows, idx.numpy()))
    x = torch.from_numpy(np.ascontiguousarray(arr[rows]))[order]
    if torch.device(device).type == "cuda":  # pinned: the copy runs asynchronously
        x = x.pin_memory()
    return x.to(device, non_blocking=True).float().div_(255.0)


def _take(cached: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of a device-resident pixel-unit tensor, as floats /255 on ``device``."""
    return cached[idx.to(cached.device)].to(device).float().div_(255.0)
