"""Pictures of a run: a victim's training-loss curve and the recall@K comparison of victims.

- :func:`loss_curve`: ``train_loss.png`` next to ``train_loss.csv`` (step → contrastive loss,
  logit scale on a second axis), logged to MLflow by ``mme train``.
- :func:`recall_chart`: image→text and text→image R@1/5/10 per victim, with the chance level,
  written by ``mme report --recall-dir`` (the DVC ``report`` stage) and logged by
  ``mme evaluate``.

matplotlib (pinned with the stack) is imported lazily with the Agg backend: headless machines
work, and a machine without it (e.g. a bare GPU box running only the compute path) skips the
picture with a note instead of failing the stage.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mme import fsio

KS = (1, 5, 10)
DIRECTIONS = (("i2t", "image → text"), ("t2i", "text → image"))


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("mme: matplotlib is not installed; skipping the picture", file=sys.stderr)
        return None
    return plt


def _save(plt: Any, fig: Any, out: Path) -> Path:
    out = Path(out)
    fig.tight_layout()
    with fsio.atomic_open(out) as f:
        fig.savefig(f, dpi=120, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def loss_curve(rows: list[dict[str, float]], out: Path, title: str = "") -> Path | None:
    """Plot ``rows`` (``train_loss.csv`` records: step, loss, logit_scale) to ``out`` (PNG)."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", lw=1.2, label="loss")
    ax.set(xlabel="step", ylabel="contrastive loss", title=title or "victim training")
    ax.grid(alpha=0.3)
    if "logit_scale" in rows[0]:
        twin = ax.twinx()  # the temperature tells whether the shortcut made training "easy"
        twin.plot(steps, [r["logit_scale"] for r in rows], color="tab:orange", lw=1, ls="--")
        twin.set_ylabel("logit scale", color="tab:orange")
    return _save(plt, fig, out)


def recall_chart(curves: dict[str, dict[str, float]], out: Path, title: str = "") -> Path | None:
    """Plot R@K per direction for each ``label -> metrics`` (``mme evaluate`` keys) to ``out``;
    the grey dashed line is the chance level of the first entry."""
    plt = _pyplot()
    if plt is None or not curves:
        return None
    first = next(iter(curves.values()))
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.6), sharey=True)
    for ax, (key, name) in zip(axes, DIRECTIONS, strict=True):
        for label, m in curves.items():
            ax.plot(KS, [m[f"{key}_r{k}"] for k in KS], marker="o", label=label)
        if all(f"chance_{key}_r{k}" in first for k in KS):
            chance = [first[f"chance_{key}_r{k}"] for k in KS]
            ax.plot(KS, chance, "--", color="grey", lw=1, label="chance")
        ax.set(xlabel="K", title=name, xticks=list(KS), ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(fontsize=8, loc="upper left")  # curves rise to the right
    if title:
        fig.suptitle(title)
    return _save(plt, fig, out)
