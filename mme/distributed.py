"""Running under ``torchrun``: which process this is, and the few collectives mme needs.

``torchrun --nproc_per_node N -m mme poison ...`` (or ``train``) sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init` joins the process group (NCCL on CUDA, gloo on CPU). Without
them, or with ``WORLD_SIZE=1``, nothing is initialised and every helper here is a no-op, so the
single-process code path (and its bytes) is exactly the plain command's.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# rank 0 writes and verifies the outputs while the others wait at a barrier: a long wait is normal
TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The launcher's view (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), no process group yet."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    rank = int(os.environ.get("RANK", "0"))
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)))


def init(device: torch.device | str = "cpu") -> World:
    """Join the torchrun process group once (no-op for one process); returns this process."""
    world = from_env()
    if world.active and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return world


def note_nproc(world: World, nproc: int, key: str) -> None:
    """``nproc`` in params.yaml is the launcher's business (dvc.yaml passes it to torchrun); say
    so when this run's process count differs, rather than silently running another way."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    if world.main and nproc != per_node:
        print(
            f"mme: {key} = {nproc} but this run has {per_node} process(es) per node; start it"
            f" with `torchrun --nproc_per_node {nproc} -m mme ...` to use {nproc}",
            file=sys.stderr,
        )


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per local rank; the CPU stays the CPU."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def all_sum_(world: World, t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process)."""
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_scalars(world: World, total: float, count: int) -> tuple[float, int]:
    """``(total, count)`` summed over ranks (as they are for one process)."""
    if not world.active:
        return total, count
    t = all_sum_(world, torch.tensor([total, float(count)], dtype=torch.float64))
    return float(t[0]), int(t[1])


def wrap_ddp(world: World, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel (buffers not broadcast: the towers keep none
    that change); one device id per rank on CUDA, none on the CPU (gloo)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def gather_rows(world: World, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rows ``counts[r]`` on rank r) in rank order, with
    gradients: the backward pass sums each rank's gradient of its rows back to that rank.

    Rows are padded to the largest count for the collective (it needs equal shapes)."""
    if not world.active:
        return x
    from torch.distributed.nn.functional import all_gather

    pad = max(counts) - x.shape[0]
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    with warnings.catch_warnings():  # deprecated in favour of a private module: keep the public one
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def shard(world: World, idx: torch.Tensor) -> torch.Tensor:
    """This rank's part of a batch of indices (strided: sizes differ by at most one)."""
    return idx[world.rank :: world.size] if world.active else idx


def counts(world: World, n: int) -> list[int]:
    """Sizes of :func:`shard`'s parts of ``n`` items, per rank."""
    return [len(range(r, n, world.size)) for r in range(world.size)]


def broadcast(world: World, obj: object) -> object:
    """Rank 0's ``obj`` on every rank (pickled; small objects only)."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(world: World, obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; small objects only)."""
    if not world.active:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def joined_group() -> Iterator[None]:
    """Run a trainer that starts DDP itself (open_clip_train) inside mme's process group.

    - its ``init_process_group`` call is skipped while a default group exists;
    - its ``DistributedDataParallel(model, device_ids=[cpu])`` on the CPU (gloo), which DDP
      rejects, gets no ``device_ids`` (DDP's rule for CPU modules)."""
    from torch.nn import parallel

    original_init, original_ddp = dist.init_process_group, parallel.DistributedDataParallel

    def init_once(*args: object, **kwargs: object) -> None:
        if not dist.is_initialized():
            original_init(*args, **kwargs)

    def ddp(module: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        ids = kwargs.get("device_ids")
        if ids and all(torch.device(i).type == "cpu" for i in ids):  # type: ignore[arg-type]
            kwargs["device_ids"] = None
        return original_ddp(module, *args, **kwargs)

    dist.init_process_group, parallel.DistributedDataParallel = init_once, ddp
    try:
        yield
    finally:
        dist.init_process_group = original_init
        parallel.DistributedDataParallel = original_ddp
