"""Keyed error minimisation (``method: keyed``): image noise built from per-word patterns of
the words the image's own captions already contain; the captions are published unchanged.

Issue 18: a trigger (MEM) is words a data user can find and strip. Here the key of image i is
its key words K_i, content words (lower case, 3+ letters, no stop word) in at least
``key_min_captions`` (2) of its captions and key for at least ``key_min_images`` images of the
set (``auto``: round(N / 300) clamped to 2..20). Each vocabulary word w has a learnable pattern
θ_w of g × g cells (``pattern_grid``, 16), bilinearly upsampled to the working size S:

    P_w = upsample(θ_w)                       θ: (V, 3, g, g) -> P: (V, 3, S, S)
    δ_i = ε · tanh(Σ_{w ∈ K_i} P_w / √|K_i|)  |δ_i| < ε; δ_i = 0 when K_i is empty

θ starts as random ±1 cells (half a grey field, half a colour one) times ``pattern_init`` (2.0).
Rounds (T = ``rounds``), EM-style like MEM: (1) M surrogate steps (``surrogate.py``) on the
images as now protected (the δ in the store); (2) ``pattern_steps`` (40) Adam steps (lr
``pattern_lr``, 0.05) on θ minimising the same contrastive loss, through the ``eot`` draws, on
batches of protected images with one random caption each: every step moves the patterns of all
words in the batch; (3) δ of every protected image is written to the store (pixel units,
rounded) for the next round and the output. An image without a key word gets no noise and is
counted unprotected. The trigger, PGD and caption-shuffle settings do not apply. One process
only (the patterns are shared by all images).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mme import fsio
from mme.config import ConfigError
from mme.protection.methods.loop import Loop, timed
from mme.protection.methods.surrogate import surrogate_steps, train_surrogate

# function words only: colours, counts of things and places are content and stay keys
STOP = frozenset(
    """a an the and or but of in on at to for with from by as into onto over under near
    is are was were be been being has have had do does did it its this that these those there
    their his her he she they them him we you i me my our your who whom which what while
    up down out off through across along around behind front top next each other some one two
    three four five several many few very just also another together""".split()
)
WORD = re.compile(r"[a-z]+")


def caption_words(caption: str) -> set[str]:
    """Lower-case alphabetic words of 3+ letters of one caption, stop words removed."""
    return {w for w in WORD.findall(caption.lower()) if w not in STOP and len(w) > 2}


def auto_min_images(n_images: int) -> int:
    """``key_min_images: auto``: round(N / 300) clamped to 2..20 (20 for 6,000 photos)."""
    return min(max(round(n_images / 300), 2), 20)


def key_words(
    captions: list[list[str]], min_captions: int, min_images: int
) -> tuple[list[str], list[list[int]]]:
    """(sorted vocabulary, per image the sorted vocabulary indices of its key words).

    A word is key for an image when it is in at least ``min_captions`` of its captions; the
    vocabulary keeps the words key for at least ``min_images`` images (each pattern is then
    seen often enough to be learnt)."""
    per_image = []
    for caps in captions:
        counts = Counter(w for cap in caps for w in caption_words(cap))
        per_image.append({w for w, c in counts.items() if c >= min_captions})
    images = Counter(w for ws in per_image for w in ws)
    vocab = sorted(w for w, c in images.items() if c >= min_images)
    index = {w: j for j, w in enumerate(vocab)}
    return vocab, [sorted(index[w] for w in ws if w in index) for ws in per_image]


def initial_patterns(v: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """(v, 3, g, g) in {-1, 0, 1}: half a ±1 grey field, half a ±1 colour field."""
    grey = torch.randint(0, 2, (v, 1, grid, grid), generator=gen).float() * 2 - 1
    colour = torch.randint(0, 2, (v, 3, grid, grid), generator=gen).float() * 2 - 1
    return 0.5 * grey.expand(-1, 3, -1, -1) + 0.5 * colour


class KeyedNoise(torch.nn.Module):
    """``idx`` (B,) -> δ (B, 3, S, S) = ε · tanh(Σ_{w ∈ K_i} upsample(θ_w) / √|K_i|)."""

    def __init__(self, keys: list[list[int]], init: torch.Tensor, eps: float, size: int) -> None:
        super().__init__()
        self.eps, self.size = eps, size
        self.theta = torch.nn.Parameter(init.clone())  # (V, 3, g, g)
        rows = [(i, w) for i, k in enumerate(keys) for w in k]
        idx = torch.tensor(rows, dtype=torch.long).reshape(-1, 2).T
        count = torch.tensor([max(len(k), 1) for k in keys], dtype=torch.float32)
        weight = 1.0 / count[idx[0]].sqrt()
        shape = (len(keys), len(init))
        mix = torch.sparse_coo_tensor(idx, weight, shape, check_invariants=True)
        self.register_buffer("mix", mix.coalesce(), persistent=False)  # (N, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        m = self.mix.index_select(0, idx.to(self.mix.device)).to_dense()  # (B, V)
        used = m.abs().sum(0).nonzero().flatten()  # upsample only the batch's words
        size = (self.size, self.size)
        up = F.interpolate(self.theta[used], size=size, mode="bilinear", align_corners=False)
        s = (m[:, used] @ up.flatten(1)).view(len(idx), 3, self.size, self.size)
        return self.eps * torch.tanh(s)


class Keyed(Loop):
    """The keyed rounds (module docstring) on the :class:`Loop` of MEM: its store, surrogate,
    random stream, device and checkpoints; the patterns and their optimiser are checkpointed."""

    def __init__(self, *args: Any, captions: list[list[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg  # one process only: mme poison refuses keyed under torchrun
        k = cfg.key_min_images
        self.min_images = auto_min_images(len(captions)) if k == "auto" else k
        self.vocab, self.keys = key_words(captions, cfg.key_min_captions, self.min_images)
        if not self.vocab:
            raise ConfigError(
                f"poison.method = keyed: no word is in {cfg.key_min_captions}+ captions of"
                f" {self.min_images}+ images; lower key_min_captions or key_min_images, or use"
                " method mem (--method mem: a trigger in the captions), which needs no shared words"
            )
        init = initial_patterns(len(self.vocab), cfg.pattern_grid, self.gen) * cfg.pattern_init
        size = self.store.clean.shape[-1]
        self.keyed = KeyedNoise(self.keys, init, self.eps, size).to(self.device)
        self.opt_p = torch.optim.Adam(self.keyed.parameters(), lr=cfg.pattern_lr)

    def run_round(self, r: int) -> dict[str, float]:
        """Round ``r``: surrogate (M steps) -> patterns (Adam) -> noise of every image."""
        t0 = time.perf_counter()
        if r == 0:  # after init_state drew the subset; a resumed run restores it as it was
            self.protect_keyed_only()
            self.write_noise()  # the first surrogate steps see the initial patterns
        stats: dict[str, float] = {}
        timed(stats, "surrogate", lambda: train_surrogate(self, surrogate_steps(self), noisy=True))
        timed(stats, "pattern", lambda: update_patterns(self))
        self.write_noise()
        stats["mean_abs_noise_px"] = self.mean_abs_noise()
        stats["round_seconds"] = time.perf_counter() - t0
        return stats

    def protect_keyed_only(self) -> None:
        """An image without a key word gets no noise (δ = 0): it is marked unprotected, so
        ``triggers.json``, the manifest's ``n_protected`` and ``mme verify`` say so."""
        has_keys = torch.tensor([bool(k) for k in self.keys])
        self.store.protect = self.store.protect & has_keys
        if not self.store.protect.any():
            raise ConfigError(
                "poison.method = keyed: no image of the protected subset has a key word; raise"
                " protect_fraction or lower key_min_captions / key_min_images"
            )

    @torch.no_grad()
    def write_noise(self) -> None:
        """δ of every protected image into the store's next buffer, which becomes current."""
        store = self.store
        store.begin_round()
        for idx in torch.nonzero(store.protect).flatten().split(256):
            store.write_noise(idx, self.keyed(idx))
        store.swap()

    def state(self) -> dict[str, Any]:
        theta = self.keyed.theta.detach().cpu()
        return super().state() | {"theta": theta, "opt_p": self.opt_p.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        with torch.no_grad():
            self.keyed.theta.copy_(state["theta"])
        self.opt_p.load_state_dict(state["opt_p"])

    def write_private(self, folder: Path) -> None:
        """``keys.json`` (vocabulary, each image's key word indices in ``triggers.json``'s row
        order) and ``patterns.npy`` (θ, float32 (V, 3, g, g)): with them the noise can be
        recomputed, so they are private like ``noise.npy``."""
        keys = {"vocab": self.vocab, "keys": self.keys, "key_min_images": self.min_images}
        fsio.write_json(folder / "keys.json", keys | {"pattern_grid": self.cfg.pattern_grid})
        with fsio.atomic_open(folder / "patterns.npy") as f:
            np.save(f, self.keyed.theta.detach().cpu().numpy().astype(np.float32))


def update_patterns(loop: Keyed) -> float:
    """``pattern_steps`` Adam steps on θ (error minimisation, surrogate frozen); mean loss."""
    store, batches = loop.store, []
    total = torch.zeros((), device=loop.device)
    steps = loop.cfg.pattern_steps
    for _ in tqdm(range(steps), desc="  patterns", leave=False, unit="step"):
        if not batches:
            batches = loop.batches(protected_only=True)
        idx = batches.pop()
        draw = loop.eot_draw(len(idx))
        tokens = store.captions(idx, loop.gen)
        keep = store.protect[idx].to(loop.device)[:, None, None, None]
        x = (store.clean_batch(idx, loop.device) + loop.keyed(idx) * keep).clamp(0, 1)
        with torch.no_grad():
            txt = loop.runtime.encode_text(tokens)
        loss = loop.clip_loss(loop.runtime.encode_image(loop.augment(x, draw)), txt)
        loop.opt_p.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt_p.step()
        total += loss.detach()
    return float(total) / max(steps, 1)
