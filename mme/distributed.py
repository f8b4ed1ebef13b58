"""Running under ``torchrun``: which process this is, and every collective mme runs.

``torchrun --nproc_per_node N -m mme poison ...`` (or ``train``) sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init` joins the process group (NCCL on CUDA, gloo on CPU). Without
them, or with ``WORLD_SIZE=1``, nothing is initialised and every helper here is a no-op, so the
single-process code path (and its bytes) is exactly the plain command's.

Every collective goes through :func:`collective` (``tests/test_distributed.py`` fails on a
``torch.distributed`` call anywhere else). It checks that each tensor is on the device the
group's backend takes (:data:`BACKEND_DEVICE`: NCCL has no CPU tensors, gloo is run with CPU
tensors only), so a tensor on the wrong device stops with a message naming the collective
instead of NCCL's "No backend type associated with device type cpu". The helpers that take a
tensor from the caller (:func:`all_sum_`) move it to :attr:`World.device` and back, so callers
never have to know the backend.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

# rank 0 writes and verifies the outputs while the others wait at a barrier: a long wait is normal
TIMEOUT = datetime.timedelta(hours=12)

BACKEND_FOR = {"cpu": "gloo", "cuda": "nccl"}  # the backend init starts for each device type
BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}  # the device type of every tensor it gets


class CollectiveDeviceError(RuntimeError):
    """A collective over a tensor on a device its backend does not take."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "gloo"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def device(self) -> torch.device:
        """Where this rank's collective tensors live: the backend's device."""
        if BACKEND_DEVICE.get(self.backend) == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


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
    if not world.active:
        return world
    if not dist.is_initialized():
        backend = BACKEND_FOR.get(torch.device(device).type, "gloo")
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=TIMEOUT)
    return replace(world, backend=str(dist.get_backend()))


def note_nproc(world: World, nproc: int, key: str) -> None:
    """``nproc`` in params.yaml is the launcher's business (dvc.yaml passes it to torchrun); when
    this run's process count differs, say which one runs (not an error)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    if world.main and nproc != per_node:
        print(
            f"mme: running {per_node} process(es) per node as started; {key} = {nproc} is"
            f" what dvc.yaml passes to torchrun --nproc_per_node, not read by this run",
            file=sys.stderr,
        )


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per local rank; the CPU stays the CPU."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def backend_devices(backend: str) -> set[str] | None:
    """Device types ``backend`` takes from mme (``cpu:gloo,cuda:nccl`` style strings too);
    None: a backend mme does not start, not checked."""
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    kind = BACKEND_DEVICE.get(backend)
    return None if kind is None else {kind}


def check_device(device: torch.device, backend: str, op: str) -> None:
    """Stop before a collective over a tensor on ``device`` that ``backend`` does not take."""
    allowed = backend_devices(backend)
    if allowed is not None and torch.device(device).type not in allowed:
        raise CollectiveDeviceError(
            f"{op} over a tensor on {device}, but the {backend} backend takes"
            f" {'/'.join(sorted(allowed))} tensors (move it to World.device first)"
        )


def collective(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)``, the one place mme calls a collective: every tensor
    argument's device is checked against the group's backend first (:func:`check_device`)."""
    backend = str(dist.get_backend())
    for t in args:
        if isinstance(t, torch.Tensor):
            check_device(t.device, backend, getattr(fn, "__name__", str(fn)))
    return fn(*args, **kwargs)


def barrier(world: World) -> None:
    if world.active:  # NCCL: on this rank's GPU (else it guesses one and may hang)
        ids = [world.local_rank] if world.device.type == "cuda" else None
        collective(dist.barrier, device_ids=ids)


def all_sum_(world: World, t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process); ``t`` may live on any device: it is
    summed on :attr:`World.device` and copied back."""
    if world.active:
        on = t.to(world.device)
        collective(dist.all_reduce, on, op=dist.ReduceOp.SUM)
        if on is not t:
            t.copy_(on)
    return t


def sum_scalars(world: World, total: float, count: int) -> tuple[float, int]:
    """``(total, count)`` summed over ranks (as they are for one process)."""
    if not world.active:
        return total, count
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=world.device)
    t = all_sum_(world, t)
    return float(t[0]), int(t[1])


def ddp_buffer_kwargs(sync: bool) -> dict[str, bool]:
    """DDP's switch for broadcasting buffers at every forward: ``forward_sync_buffers`` where
    this torch has it (``broadcast_buffers`` is deprecated there), else ``broadcast_buffers``."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: sync}


def wrap_ddp(world: World, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel; one device id per rank on CUDA, none on the
    CPU (gloo). Buffers are broadcast from rank 0 once, at construction, not at every forward:
    the surrogate's only changing buffers are BatchNorm statistics, which
    :mod:`mme.protection.methods.syncbn` keeps equal on every rank."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return collective(DistributedDataParallel, module, device_ids=ids, **ddp_buffer_kwargs(False))


def gather_rows(world: World, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rows ``counts[r]`` on rank r) in rank order, with
    gradients: the backward pass sums each rank's gradient of its rows back to that rank.

    Rows are padded to the largest count for the collective (it needs equal shapes)."""
    if not world.active:
        return x
    pad = max(counts) - x.shape[0]
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    parts = all_gather_grad(padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def all_gather_grad(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's ``x`` (same shape on every rank), in rank order, differentiable: the
    backward pass sums every rank's gradient of part r back to rank r."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private module: keep the public one
        warnings.simplefilter("ignore", FutureWarning)
        return collective(all_gather, x)


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
    collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def gather_objects(world: World, obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; small objects only)."""
    if not world.active:
        return [obj]
    out: list[object] = [None] * world.size
    collective(dist.all_gather_object, out, obj)
    return out


def digest(obj: object) -> str:
    """A hash of a nested state (dicts, lists, tensors on any device, numbers, strings)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: object) -> None:
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(obj).encode())


def check_same(world: World, what: str, value: object) -> None:
    """Stop when ``value`` (e.g. a digest of the surrogate's state) differs between ranks:
    state every rank must hold identically, which a checkpoint stores from rank 0 only."""
    values = gather_objects(world, value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise RuntimeError(f"{what} differs between rank 0 and rank(s) {odd}: the replicas drifted")


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
