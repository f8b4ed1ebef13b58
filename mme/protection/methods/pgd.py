"""Projected gradient steps on a sample-wise image perturbation.

Spec (Madry et al. 2018, L∞; error-minimising variant of Huang et al. 2021, "Unlearnable
Examples"; used by MEM, arXiv 2407.16307 Alg. 1):

    δ ← δ − α · sign(∇δ L)          (minimise, MEM/EM)   or  δ ← δ + α · sign(∇δ L)  (maximise)
    δ ← clip(δ, −ε, ε)              (project onto the L∞ ball)
    δ ← clip(x + δ, 0, 1) − x       (keep the perturbed image valid)

Shapes: ``x``, ``delta``, ``grad`` are ``(B, 3, H, W)``; ``x`` in [0, 1]; ``alpha`` and ``eps`` in
[0, 1] units (the paper: α = 1/255, ε = 8/255). With α and ε whole multiples of 1/255 and x
read from uint8, δ stays on the 1/255 grid, so it is stored exactly as int8 pixel units.
Defaults: 8 steps (paper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def pgd_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    eps: float,
    minimize: bool = True,
) -> torch.Tensor:
    """One signed step, projected to ``‖δ‖∞ ≤ eps`` and to ``x + δ ∈ [0, 1]``."""
    direction = -1.0 if minimize else 1.0
    delta = delta + direction * alpha * grad.sign()
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0) - x


def pgd(
    x: torch.Tensor,
    delta: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    steps: int,
    alpha: float,
    eps: float,
    minimize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``steps`` PGD steps from ``delta``; return ``(delta, mean loss)`` (loss on device).

    ``loss_fn(x_adv, step)`` gets the perturbed images ``(B, 3, H, W)`` and the step index (so the
    caller can change the texts per step, e.g. MEM's caption shuffle) and returns a scalar loss.
    Only ``δ`` gets a gradient: callers freeze the model's parameters.
    """
    total = torch.zeros((), device=x.device)
    delta = delta.detach()
    for step in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta, step)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = pgd_step(delta.detach(), grad, x, alpha, eps, minimize)
        total += loss.detach()
    return delta, total / max(steps, 1)
