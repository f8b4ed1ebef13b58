"""The surrogate's optimiser: AdamW with CLIP's weight-decay rule."""

from __future__ import annotations

from typing import Any

import torch

NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """CLIP's rule (open_clip_train; the MEM code's CyCLIP-derived trainer): gains, biases, norm
    layers and the temperature are not decayed; weight matrices and embeddings are."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_KEYS)


def decay_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``wd`` for weights, 0 for what :func:`no_decay` excludes."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": wd},
    ]


def adamw(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups` (the MEM paper: lr 1e-4, wd 0.2)."""
    return torch.optim.AdamW(decay_groups(model, wd), lr=lr, weight_decay=0.0)
