"""BatchNorm with the whole batch's statistics across ranks, for BatchNorm surrogates (RN50).

Under torchrun each rank encodes its share of a surrogate batch (``surrogate.py``). A plain
BatchNorm would normalise each share with its own statistics and update its own running
statistics: the ranks' surrogates drift apart, HotFlip and PGD (eval mode) use a different
model on each rank, and a checkpoint (rank 0's) does not restore the others. In training mode
:class:`SyncedBatchNorm` combines every share's statistics with one differentiable all-gather,
so the forward pass is the one-process batch's up to float rounding, the gradient flows through
the statistics as in one process, and every rank updates identical running statistics.

Spec (Ioffe & Szegedy 2015; the parallel variance of Chan, Golub & LeVeque 1979): rank r holds
n_r values per channel with mean m_r and sum of squared deviations M2_r;

    n = Σ n_r,   μ = Σ n_r m_r / n,   σ² = Σ (M2_r + n_r (m_r − μ)²) / n      (biased)
    y = (x − μ) / sqrt(σ² + eps) · γ + β
    running_mean ← (1 − m) running_mean + m μ,   running_var ← (1 − m) running_var + m σ² n/(n − 1)

``torch.nn.SyncBatchNorm`` does this on GPUs only (it refuses CPU tensors, so gloo runs and the
tests could not use it); this module works on every backend. Eval mode, and one process, are
plain BatchNorm. Parameters and buffers are the replaced module's own tensors (same
``state_dict`` keys, same optimiser entries). Shapes: x (B, C, ...), statistics (C,).
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mme import distributed


class SyncedBatchNorm(_BatchNorm):
    """A BatchNorm of any dimension whose training statistics span every rank's rows."""

    def __init__(self, bn: _BatchNorm, world: distributed.World) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias  # the same tensors: optimiser and state
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self.training = bn.training
        self._world = world

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self._world.active):
            return super().forward(x)
        mean, var, n = self._global_stats(x.float())
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), n)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def _global_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ, σ², n) over every rank's rows (see the module docstring); tensors on x's device
        (no host synchronisation)."""
        dims = [0, *range(2, x.dim())]
        c, n_local = x.shape[1], x.numel() // max(x.shape[1], 1)
        if n_local:
            m = x.mean(dims)
            m2 = (x - m.view(1, -1, *([1] * (x.dim() - 2)))).square().sum(dims)
        else:  # a rank without rows this step adds nothing
            m = m2 = x.new_zeros(c)
        local = torch.cat([x.new_full((1,), float(n_local)), m, m2])
        parts = torch.stack(distributed.all_gather_grad(local))  # (world, 2C + 1)
        counts, means, m2s = parts[:, :1], parts[:, 1 : c + 1], parts[:, c + 1 :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s + counts * (means - mean).square()).sum(0) / n
        return mean, var, n

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp(min=1), alpha=m)


def sync_batchnorm(module: torch.nn.Module, world: distributed.World) -> int:
    """Replace every BatchNorm in ``module`` (in place) by a :class:`SyncedBatchNorm` holding
    the same tensors; a no-op for one process. Returns how many were replaced."""
    if not world.active:
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, SyncedBatchNorm):
                setattr(parent, name, SyncedBatchNorm(child, world))
                replaced += 1
    return replaced
