"""The random stream of a protection run and its checkpointed state.

One generator, ``gen`` (seeded with ``poison.seed``), drives every draw of the loop: batch
orders, captions, caption shuffles and the EOT transformations (``augment.py``). Under torchrun
every rank makes every draw, those of the batches another rank computes and of the rows of a
surrogate batch another rank encodes included, so the ranks stay in step and image i sees the
same caption, shuffle and EOT draw whatever the number of processes: N = 1, 2, 4 differ only by
float rounding (docs/scaling.md). For one process this is the order of draws mme always had.

The surrogate's initialisation draws from torch's global generator (seeded the same on every
rank); its state is checkpointed too. Both states are the same on every rank, which
:meth:`~mme.protection.methods.loop.Loop.state` checks before a checkpoint keeps rank 0's.
"""

from __future__ import annotations

from typing import Any

import torch


def generator(seed: int) -> torch.Generator:
    """The run's one stream (see the module docstring)."""
    return torch.Generator().manual_seed(seed)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """The streams' state for a checkpoint."""
    return {"gen": gen.get_state(), "torch_rng": torch.get_rng_state()}


def load_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    """Restore :func:`rng_state` (a checkpoint of mme < issue 21 also held per-rank EOT
    generators, ``aug_gens``: no longer used)."""
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
