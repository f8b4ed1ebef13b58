"""Where and how the surrogate runs: the device, the precision, the input normalisation, an
optionally compiled image tower, and (on a GPU with room) the store's pixels kept on the device.

Every step of a round encodes through :class:`Runtime`, so the device and precision choices live
in one place: bf16 autocast and channels-last on CUDA, plain fp32 on the CPU (bf16 there is slow
and inexact). Shapes: images ``(B, 3, S, S)`` in [0, 1]; tokens ``(n, L)``; features ``(·, D)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mme.config import PoisonConfig
from mme.models import normalizer
from mme.protection.methods import text
from mme.protection.methods.store import PairStore

CACHE_SHARE = 0.4  # the store moves to the GPU when it takes less than this share of free memory


class Runtime:
    """The surrogate's encoders on ``device`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cfg: PoisonConfig, device: torch.device) -> None:
        self.model, self.device = model, torch.device(device)
        self.cuda = self.device.type == "cuda"
        mean, std = normalizer(model)
        self.mean = mean.to(self.device)[:, None, None]
        self.std = std.to(self.device)[:, None, None]
        self.text_chunk = max(cfg.batch_size * 4, 256)  # HotFlip sends B x C texts at once
        self.encode_image_raw = model.encode_image
        if self.cuda:
            model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        if cfg.compile:  # the image tower carries almost all PGD work
            self.encode_image_raw = torch.compile(model.encode_image)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda:  # bf16 on the GPU; fp32 on the CPU (bf16 there is slow and inexact)
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the surrogate's normalised input."""
        return (x - self.mean) / self.std

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, D) unit features."""
        x = self.normalize(x)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return F.normalize(self.encode_image_raw(x).float(), dim=-1)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L) -> (n, D) raw text features, captions trimmed to the longest (``text.py``)."""
        return text.encode_text(self.model, tokens)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, L) -> (n, D) unit features, in chunks."""
        with self.autocast():
            out = [
                self.text_features(t.to(self.device)).float() for t in tokens.split(self.text_chunk)
            ]
        return F.normalize(torch.cat(out), dim=-1)

    def scale(self) -> torch.Tensor:
        """The surrogate's temperature exp(logit_scale), detached."""
        return self.model.logit_scale.exp().detach()

    def cache_store(self, store: PairStore) -> None:
        """Move the store's pixels and noise to the GPU when they take < 40 % of free memory.

        Done on first use (after ``init_state`` / ``--resume`` filled the noise), not at start."""
        if self.cuda and not store.cached:
            free, _ = torch.cuda.mem_get_info(self.device)
            if store.device_bytes() < CACHE_SHARE * free:
                store.cache_on(self.device)
