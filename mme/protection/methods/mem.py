"""Multi-step Error Minimization (MEM) and the baselines that share its loop.

Spec (Liu et al., "Multimodal Unlearnable Examples: Protecting Data against Multimodal
Contrastive Learning", ACM MM 2024, arXiv 2407.16307, Alg. 1). Per image i: noise δ_i with
‖δ_i‖∞ ≤ ε and a trigger t_i of k tokens prepended to all its captions. T outer rounds of

1. surrogate: M steps of contrastive (open_clip ``ClipLoss``) training on the protected pairs
   ``(x_i + δ_i, t_i ⊕ caption)``, AdamW (``surrogate.py``);
2. triggers (rounds < H): HotFlip over all protected pairs (``trigger_step.py``, ``hotflip.py``);
3. noise: S steps of error-minimising PGD over all protected pairs (``noise_step.py``,
   ``pgd.py``) with, at each step, the caption bodies shuffled within the batch while each
   trigger stays with its own image — the loss can then only be lowered by binding the noise to
   the trigger.

Paper defaults: ε = 8/255, α = 1/255, S = 8, T = 20, M = 200, batch 128, lr 1e-4, H = 5, C = 16,
k ∈ {3, 5}. Shapes: images (B, 3, S, S) in [0, 1]; tokens (B, L); triggers (B, k).

Baselines (same loop, ``method``): ``em`` image-only error minimisation (no trigger, no shuffle);
``errmax`` surrogate trained on clean pairs, then error-maximising PGD (TAP-like); ``random``
uniform integer noise in [−ε, ε] (no model).

Beside the loop: what the steps share (``loop.py``), device and precision (``runtime.py``), the
random streams (``rng.py``), the optimiser (``optim.py``); every collective goes through
:mod:`mme.distributed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mme.protection.methods.loop import Loop, timed
from mme.protection.methods.noise_step import update_noise
from mme.protection.methods.surrogate import surrogate_steps, train_surrogate
from mme.protection.methods.trigger_step import update_triggers

RoundHook = Callable[[int, dict[str, float]], None]


class MEM(Loop):
    """The outer loop (Alg. 1): :meth:`run_round` for r = 0 .. T-1, resumable from any round
    (:meth:`~Loop.state` / :meth:`~Loop.load_state`). The three steps are separate functions
    (``surrogate.py``, ``trigger_step.py``, ``noise_step.py``) a new method can reorder."""

    def run_round(self, r: int) -> dict[str, float]:
        """Round ``r``: surrogate (M steps) -> triggers (HotFlip, r < H) -> noise (S PGD steps)."""
        cfg, t0, m = self.cfg, time.perf_counter(), surrogate_steps(self)
        stats: dict[str, float] = {}
        if cfg.method == "errmax":  # surrogate on clean pairs; one maximising pass at the end
            timed(stats, "surrogate", lambda: self.train_surrogate(m, noisy=False))
            if r == cfg.rounds - 1:
                timed(stats, "pgd", lambda: self.update_noise(minimize=False, shuffle=False))
        else:
            timed(stats, "surrogate", lambda: self.train_surrogate(m, noisy=True))
            if self.with_trigger and r < cfg.trigger_rounds:
                timed(stats, "trigger", self.update_triggers)
            shuffle = self.with_trigger and cfg.shuffle_captions
            timed(stats, "pgd", lambda: self.update_noise(minimize=True, shuffle=shuffle))
        if "pgd_loss" in stats:
            self.store.swap()  # the new noise becomes the current one
        stats["mean_abs_noise_px"] = self.mean_abs_noise()
        stats["round_seconds"] = time.perf_counter() - t0
        return stats

    def train_surrogate(self, steps: int, noisy: bool) -> float:
        """Step 1 (:func:`~mme.protection.methods.surrogate.train_surrogate`); mean loss."""
        return train_surrogate(self, steps, noisy)

    def update_triggers(self) -> float:
        """Step 2 (:func:`~mme.protection.methods.trigger_step.update_triggers`); mean loss."""
        return update_triggers(self)

    def update_noise(self, minimize: bool, shuffle: bool) -> float:
        """Step 3 (:func:`~mme.protection.methods.noise_step.update_noise`); mean loss."""
        return update_noise(self, minimize, shuffle)
