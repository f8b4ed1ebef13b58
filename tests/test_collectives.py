"""Collectives on every backend, BatchNorm under DDP, the CUDA path without a GPU (issue 21).

- Every collective goes through ``mme.distributed.collective``, which checks each tensor's
  device against the backend (a static test finds any other ``torch.distributed`` call).
- A real 2-process gloo group (``torch.multiprocessing``): ``SyncedBatchNorm`` equals a
  one-process BatchNorm over the whole batch (outputs, gradients, running statistics), the
  device check stops a collective over a tensor gloo does not take, the helpers' sums.
- The meta device: each step's per-batch device code (HotFlip, PGD with every EOT kind, the
  surrogate's loss and AdamW step) with every tensor on ``loop.device`` = meta; a CPU tensor
  mixed in would fail here as it fails on CUDA.
- NCCL's choices (backend, GPU per rank, barrier device) with the process group mocked.
"""

from __future__ import annotations

import ast
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mme import distributed
from mme.config import ConfigError, PoisonConfig

ROOT = Path(__file__).resolve().parents[1]
# the collectives of torch.distributed (and its autograd versions); only distributed.py may
# name them, and only as the first argument of ``collective``
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "barrier",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "gather", "scatter",
    "all_to_all", "send", "recv", "isend", "irecv", "DistributedDataParallel",
}  # fmt: skip


def torch_distributed_uses(path: Path) -> list[str]:
    """Lines of ``path`` that import or name ``torch.distributed``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_module_but_mme_distributed_calls_torch_distributed():
    files = [*(ROOT / "mme").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]
    offenders = [
        hit
        for p in files
        if p != ROOT / "mme" / "distributed.py"
        for hit in torch_distributed_uses(p)
    ]
    assert offenders == []


def test_mme_distributed_runs_every_collective_through_its_one_helper():
    """No call of a collective in distributed.py but ``collective(fn, ...)``'s own."""
    tree = ast.parse((ROOT / "mme" / "distributed.py").read_text())
    direct = [
        f"{name} at line {node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (name := getattr(node.func, "attr", getattr(node.func, "id", None))) in COLLECTIVES
    ]
    assert direct == []


@pytest.mark.parametrize(
    "backend, device, ok",
    [
        ("gloo", "cpu", True),
        ("gloo", "cuda:0", False),
        ("gloo", "meta", False),
        ("nccl", "cuda:1", True),
        ("nccl", "cpu", False),  # the crash of issue 21: NCCL has no CPU backend
        ("cpu:gloo,cuda:nccl", "cpu", True),
        ("cpu:gloo,cuda:nccl", "cuda:0", True),
        ("cpu:gloo,cuda:nccl", "meta", False),
        ("mpi", "cpu", True),  # a backend mme never starts: not checked
    ],
)
def test_the_device_check_knows_what_each_backend_takes(backend, device, ok):
    if ok:
        distributed.check_device(torch.device(device), backend, "all_reduce")
    else:
        with pytest.raises(distributed.CollectiveDeviceError, match=f"all_reduce over .*{backend}"):
            distributed.check_device(torch.device(device), backend, "all_reduce")


@pytest.mark.parametrize(
    "backend, local_rank, want",
    [("gloo", 1, "cpu"), ("nccl", 1, "cuda:1"), ("nccl", 0, "cuda:0")],
)
def test_a_rank_sums_on_its_backends_device(backend, local_rank, want):
    assert distributed.World(local_rank, 2, local_rank, backend).device == torch.device(want)


def test_on_cuda_init_starts_nccl_on_the_ranks_gpu_and_barriers_name_it(monkeypatch):
    calls: list[tuple] = []
    dist = distributed.dist
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b, **kw: calls.append(("init", b)))
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("gpu", i)))
    world = distributed.init("cuda")
    distributed.barrier(world)
    assert world == distributed.World(1, 2, 1, "nccl")
    assert calls == [("gpu", 1), ("init", "nccl"), ("barrier", {"device_ids": [1]})]


def test_digest_tells_states_apart():
    state = {"model": {"w": torch.ones(3), "n": torch.tensor(2)}, "gen": [1, "a"]}
    same = {"gen": [1, "a"], "model": {"n": torch.tensor(2), "w": torch.ones(3)}}
    assert distributed.digest(state) == distributed.digest(same)
    state["model"]["w"][1] = 1.0 + 1e-7
    assert distributed.digest(state) != distributed.digest(same)
    assert distributed.digest(torch.ones(2)) != distributed.digest(torch.ones(2, dtype=torch.int64))


def test_more_processes_than_a_surrogate_batch_has_rows_is_refused():
    from mme.protection.poison import check_world

    cfg = PoisonConfig(batch_size=4, device="cpu")
    check_world(cfg, distributed.World(0, 4), 10)
    with pytest.raises(ConfigError, match="batch_size = 4 .*5 processes"):
        check_world(cfg, distributed.World(0, 5), 10)
    with pytest.raises(ConfigError, match="3 train images"):
        check_world(cfg, distributed.World(0, 4), 3)


# -- a real 2-process gloo group ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_worker(rank: int, size: int, port: int) -> None:
    """Runs in each of ``size`` processes (torch.multiprocessing); raises on any failure."""
    import os

    torch.set_num_threads(1)
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    world = distributed.init("cpu")
    try:
        check_sums_and_devices(world)
        for n in (8, 7):  # an even and an uneven split of the batch
            check_synced_batchnorm(world, n)
        check_ddp_wraps_without_warnings(world)
    finally:
        distributed.dist.destroy_process_group()


def check_sums_and_devices(world: distributed.World) -> None:
    assert world.backend == "gloo" and world.device == torch.device("cpu")
    t = distributed.all_sum_(world, torch.tensor([world.rank + 1.0, 1.0]))
    assert t.tolist() == [3.0, 2.0]
    assert distributed.sum_scalars(world, 0.5, 2) == (1.0, 4)
    with pytest.raises(distributed.CollectiveDeviceError, match="all_reduce over a tensor on meta"):
        distributed.collective(distributed.dist.all_reduce, torch.ones(2, device="meta"))
    distributed.check_same(world, "a value", "same")
    with pytest.raises(RuntimeError, match=r"a value differs between rank 0 and rank\(s\) \[1\]"):
        distributed.check_same(world, "a value", world.rank)
    x = torch.arange(3.0 + world.rank).requires_grad_(True)[:, None]
    rows = distributed.gather_rows(world, x, [3, 4])
    assert rows[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 3]


def check_synced_batchnorm(world: distributed.World, n: int) -> None:
    """Rank r's rows through SyncedBatchNorm == the same rows of one BatchNorm over the batch."""
    from mme.protection.methods.syncbn import SyncedBatchNorm, sync_batchnorm

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 4, 3, 3, generator=g) * 3 + 1
    w = torch.randn(n, 4, 3, 3, generator=g)
    ref = torch.nn.BatchNorm2d(4).train()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm2d(4))
    net[1].load_state_dict(ref.state_dict())
    net.train()
    assert sync_batchnorm(net, world) == 1 and isinstance(net[1], SyncedBatchNorm)
    xr = x.clone().requires_grad_(True)
    (ref(xr) * w).sum().backward()
    local = distributed.shard(world, torch.arange(n))
    xl = x[local].clone().requires_grad_(True)
    y = net(xl)
    (y * w[local]).sum().backward()
    assert torch.allclose(y, ref(x)[local], atol=1e-5)  # (a second ref pass: stats unchanged)
    assert torch.allclose(xl.grad, xr.grad[local], atol=1e-5)
    for name in ("weight", "bias"):
        grad = distributed.all_sum_(world, getattr(net[1], name).grad.clone())
        assert torch.allclose(grad, getattr(ref, name).grad, atol=1e-4), name
    ref_stats = ref.state_dict()  # two training passes on ref: compare after one
    ref2 = torch.nn.BatchNorm2d(4).train()
    ref2(x)
    assert torch.allclose(net[1].running_mean, ref2.running_mean, atol=1e-6)
    assert torch.allclose(net[1].running_var, ref2.running_var, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 1 and int(ref_stats["num_batches_tracked"]) == 2
    net.eval()
    assert torch.allclose(net(x), torch.nn.functional.batch_norm(
        x, ref2.running_mean, ref2.running_var, net[1].weight, net[1].bias, eps=net[1].eps
    ), atol=1e-6)  # fmt: skip


def check_ddp_wraps_without_warnings(world: distributed.World) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # broadcast_buffers is deprecated
        distributed.wrap_ddp(world, torch.nn.Linear(2, 2), torch.device("cpu"))


def test_a_two_process_gloo_group_syncs_batchnorm_sums_and_checks_devices():
    import torch.multiprocessing as mp

    mp.spawn(group_worker, args=(2, free_port()), nprocs=2, join=True)


# -- the CUDA path on the meta device -------------------------------------------------------


def meta_loop(model_name: str, random_places: bool, kinds: list[str]):
    """A :class:`Loop` of 4 pairs on the meta device (the store's arrays stay on the host, as
    a memory-mapped store does)."""
    from mme import models
    from mme.protection.methods.loop import Loop
    from mme.protection.methods.store import PairStore
    from mme.protection.methods.triggers import candidate_mask

    model, tokenizer = models.create_model(model_name, None, "cpu")
    n, size = 4, models.image_size(model)
    rng = np.random.default_rng(0)
    caps = ["a red circle", "a blue square on grass", "two green shapes", "a small star"]
    tokens = tokenizer(caps + caps)
    store = PairStore(
        clean=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
        noise=[np.zeros((n, 3, size, size), np.int8) for _ in range(2)],
        current=0,
        cap_tokens=tokens.numpy().astype(np.int32),
        cap_offsets=torch.tensor([0, 2, 4, 6, 8]),
        triggers=torch.randint(300, 400, (n, 3)),
        protect=torch.tensor([True, True, False, True]),  # a negative row, as Loop.negative
        eot_id=tokenizer.eot_token_id,
        trigger_word=torch.ones(n, dtype=torch.long) if random_places else None,
        trigger_col=torch.tensor([2, 2, 1, 3, 2, 2, 1, 1]) if random_places else None,
    )
    cfg = PoisonConfig(model=model_name, device="cpu", eot=kinds, pgd_steps=2, candidates=2)
    allowed = candidate_mask(tokenizer, model.token_embedding.num_embeddings)
    return Loop(model.to("meta"), store, cfg, torch.device("meta"), allowed)


@pytest.mark.parametrize(
    "model_name, random_places, kinds",
    [("mme-tiny-vit", False, ["crop"]), ("mme-tiny-rn", True, ["resize", "jpeg", "crop"])],
)
def test_every_steps_batch_work_stays_on_the_loops_device(
    monkeypatch, model_name, random_places, kinds
):
    """HotFlip, PGD (EOT on) and a surrogate step on the meta device: an operation mixing a
    CPU tensor into the device's work raises here as it does on CUDA (which the jpeg EOT's
    quantisation tables did before issue 21)."""
    import torch.fx.experimental._config as fx_config

    from mme.protection.methods import text
    from mme.protection.methods.noise_step import draw_noise_batch, noise_batch
    from mme.protection.methods.surrogate import Towers, surrogate_loss
    from mme.protection.methods.trigger_step import trigger_batch

    # meta tensors hold no values: trim texts to the full context, let masks count as all-true
    monkeypatch.setattr(text, "trimmed_length", lambda tokens: tokens.shape[1])
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        loop = meta_loop(model_name, random_places, kinds)
        idx = torch.tensor([2, 0, 3, 1])
        loop.model.eval().requires_grad_(False)
        caps, cols = loop.store.pick_captions(idx, loop.gen)
        new, own = trigger_batch(loop, idx, caps, cols)
        assert (new.device.type, own.shape) == ("meta", (4,))
        delta, loss = noise_batch(loop, idx, draw_noise_batch(loop, idx, shuffle=True), True)
        assert delta.device.type == loss.device.type == "meta" and delta.shape[0] == 4
        loop.model.train().requires_grad_(True)
        loss = surrogate_loss(loop, Towers(loop), idx, noisy=True)
        loss.backward()
        loop.opt.step()
    assert loss.device.type == "meta"
    assert all(p.device.type == "meta" for p in loop.model.parameters())


def test_the_cuda_encoding_path_keeps_the_device():
    """Runtime's CUDA branch (channels-last input; its bf16 autocast is disabled, with a
    warning, where CUDA is missing) on the meta device."""
    loop = meta_loop("mme-tiny-rn", False, ["crop"])
    loop.runtime.cuda = True
    x = torch.rand(2, 3, 64, 64).to("meta")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CUDA is not available", UserWarning)
        assert loop.runtime.encode_image(x).device.type == "meta"
