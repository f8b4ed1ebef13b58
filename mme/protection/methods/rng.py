"""The random streams of a protection run and their checkpointed state.

``gen`` drives every data draw (batch orders, captions, caption shuffles, the trigger start);
under torchrun every rank keeps it in step (same batches, same captions). The EOT
transformations draw from ``aug_gen``: ``gen`` itself for one process, a generator of the rank's
own otherwise, so the ranks augment differently as one process would over the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch

from mme import distributed


def generators(seed: int, world: distributed.World) -> tuple[torch.Generator, torch.Generator]:
    """``(gen, aug_gen)`` for ``seed`` on this rank (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if not world.active:
        return gen, gen
    return gen, torch.Generator().manual_seed(seed * 1000 + 1 + world.rank)


def rng_state(
    gen: torch.Generator, aug_gen: torch.Generator, world: distributed.World
) -> dict[str, Any]:
    """The streams' state for a checkpoint; under torchrun a collective (every rank's
    ``aug_gen``)."""
    state = {"gen": gen.get_state(), "torch_rng": torch.get_rng_state()}
    if world.active:
        state["aug_gens"] = distributed.gather_objects(world, aug_gen.get_state())
    return state


def load_rng_state(
    state: dict[str, Any], gen: torch.Generator, aug_gen: torch.Generator, world: distributed.World
) -> None:
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    if world.active and "aug_gens" in state:
        aug_gen.set_state(state["aug_gens"][world.rank])
