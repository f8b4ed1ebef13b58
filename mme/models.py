"""CLIP models: architectures are open_clip JSON configs, created locally, never downloaded.

Our own configs live in ``mme/model_configs/*.json`` (same schema as open_clip's built-ins) and
are added to open_clip's registry by :func:`register_configs`, so every open_clip entry point
(``open_clip.create_model``, ``open_clip.get_tokenizer``, ``open_clip_train``) knows them by name:

- ``mme-tiny-vit``: ViT, 64 px, patch 8, width 128, 4 layers, embed 128 (CPU-sized).
- ``mme-tiny-rn``: ModifiedResNet (CLIP RN50 design) with one block per stage, 64 px.

Both have a small text tower (width 128, 4 layers, 4 heads, context 48). Built-in open_clip
names (``RN50``, ``ViT-B-32``, ...) work too; their weights are only ever loaded from a local
``pretrained`` file.

Tokenizers sit beside the models: :func:`create_model` returns the model's own, and
:func:`load_tokenizer` (offline, CLIP BPE when unknown) with :func:`token_ids` give what a victim's
tokenizer makes of a text (``mme verify`` checks triggers with them).

Library images are ``(B, 3, H, W)`` float tensors in ``[0, 1]``; :func:`preprocess_images` maps
them to what the model's image tower expects (its size and normalisation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from mme.config import ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_SAFE_WEIGHTS, HF_WEIGHTS = "open_clip_model.safetensors", "open_clip_pytorch_model.bin"


class DeviceError(ConfigError, RuntimeError):
    """The requested device does not exist here (a user error: exit 2 with one line)."""


class CheckpointNotFound(ConfigError, FileNotFoundError):
    """A ``pretrained`` checkpoint that is neither a file nor cached (a user error)."""


_registered = False


def register_configs() -> None:
    """Add ``mme/model_configs`` to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def mme_model_names() -> list[str]:
    """Names of the configs this package ships."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` naming the available models if ``name`` is not a known config."""
    register_configs()
    if name not in open_clip.list_models():
        builtin = [n for n in open_clip.list_models() if n not in mme_model_names()]
        raise ValueError(
            f"unknown model {name!r}; mme configs: {', '.join(mme_model_names())}; "
            f"open_clip built-ins: {', '.join(builtin)}"
        )


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; anything else as given (``"cuda"`` must exist)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} requested but CUDA is not available: use --device cpu (or auto)"
        )
    return dev


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it (read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def resolve_pretrained(name: str, pretrained: Path | str) -> tuple[Path, bool]:
    """``(local file, quick_gelu)`` for ``pretrained``: a checkpoint file, or an open_clip
    ``model:tag`` (or a ``tag`` of ``name``) whose weights are in the local Hugging Face cache.

    Nothing is downloaded: a tag that is not cached is an error naming how to get it.
    """
    from huggingface_hub import try_to_load_from_cache

    text = str(pretrained)
    if Path(text).is_file():
        return Path(text), False
    model, _, tag = text.rpartition(":") if ":" in text else (name, "", text)
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise CheckpointNotFound(
            f"pretrained {text!r} not found: no such file, and not an open_clip model:tag "
            f"(tags of {name}: {tags})"
        )
    if model != name:
        raise ConfigError(f"pretrained {text!r} is for model {model}: pass --model {model}")
    if not cfg.get("hf_hub"):
        raise CheckpointNotFound(
            f"pretrained {text!r} has no Hugging Face hub id: download its file, pass the path"
        )
    repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" or "org/name/file", as open_clip
    names = [filename] if filename else [HF_SAFE_WEIGHTS, HF_WEIGHTS]
    for fname in names:
        hit = try_to_load_from_cache(repo, fname, cache_dir=hf_hub_cache())
        if isinstance(hit, str):
            return Path(hit), bool(cfg.get("quick_gelu", False))
    raise CheckpointNotFound(
        f"pretrained {text!r}: {repo} is not in the local cache {hf_hub_cache()}: fetch it once "
        f"where there is internet (huggingface-cli download {repo}), or pass a checkpoint file"
    )


@contextlib.contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    """Drop the root logger's "No pretrained weights loaded" record for the block."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def create_model(
    name: str, pretrained: Path | str | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """Build model ``name`` (from scratch, or weights from ``pretrained``) + its tokenizer.

    ``pretrained`` is a local file -- an open_clip_train checkpoint (``{"state_dict": ...}``,
    keys possibly ``module.``-prefixed) or a plain state dict -- or an open_clip ``model:tag``
    already in the local Hugging Face cache (:func:`resolve_pretrained`); loading is strict. The
    model is returned in eval mode on ``device`` (``"auto"`` allowed). Nothing is downloaded.
    """
    check_model_name(name)
    dev = resolve_device(device)
    path, quick_gelu = resolve_pretrained(name, pretrained) if pretrained else (None, False)
    # weights are loaded by us, not via open_clip's `pretrained=` (which downloads what it lacks);
    # open_clip then warns "No pretrained weights loaded ... initialized randomly" on every run,
    # which is what a surrogate trained from scratch is meant to be: that one warning is muted
    with _quiet_root_warnings():
        model = open_clip.create_model(
            name, pretrained=None, device="cpu", force_quick_gelu=quick_gelu
        )
    if path is not None:
        open_clip.load_checkpoint(model, str(path), strict=True, device="cpu")
    model = model.to(dev).eval()
    return model, open_clip.get_tokenizer(name)


@lru_cache(maxsize=4)
def load_tokenizer(model_name: str) -> Any:
    """open_clip tokenizer of ``model_name``; the plain CLIP BPE tokenizer if it is unknown.

    The mme configs are registered first. Unknown names (a custom config of another machine) and
    tokenizers that would need a download fall back to ``SimpleTokenizer``, which every CLIP-BPE
    model shares and which ships with open_clip — verify must work offline.
    """
    register_configs()
    if model_name in open_clip.list_models():
        try:
            return open_clip.get_tokenizer(model_name)
        except Exception as err:  # e.g. an HF tokenizer that is not cached (no internet)
            print(
                f"mme: tokenizer of {model_name} unavailable ({err}); using CLIP BPE",
                file=sys.stderr,
            )
    return open_clip.tokenizer.SimpleTokenizer()


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Ids each text becomes between the start and end tokens, as the victim's tokenizer sees it
    (including truncation to the context length)."""
    rows = tokenizer(texts).tolist()
    eot = getattr(tokenizer, "eot_token_id", None)
    out = []
    for row in rows:
        body = row[1:]
        end = body.index(eot) if eot in body else len(body)
        out.append(body[:end])
    return out


def image_size(model: torch.nn.Module) -> int:
    """Side length (px) of the square images the model's image tower takes."""
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square model input {size} is not supported")
        size = size[0]
    return int(size)


def config_image_size(name: str) -> int:
    """Side length (px) of model ``name``'s images, from its config (nothing is built)."""
    register_configs()
    cfg = open_clip.get_model_config(name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def normalizer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the model's input normalisation, each a float tensor of shape (3,)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32)
    return mean, std


def preprocess_images(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Map images ``(B, 3, H, W)`` in ``[0, 1]`` to model input: resize if needed, normalise.

    Differentiable (the poisoning code back-propagates through it). Non-square inputs are
    squashed to the model's square size; bicubic matches open_clip's own preprocessing.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    size = image_size(model)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = normalizer(model)
    mean, std = mean.to(x.device, x.dtype), std.to(x.device, x.dtype)
    return (x - mean[:, None, None]) / std[:, None, None]


def val_transform(model: torch.nn.Module) -> Any:
    """open_clip's evaluation preprocessing for ``model`` (PIL image -> normalised tensor).

    The same transform open_clip_train builds as ``preprocess_val``: resize the short side,
    centre-crop, to tensor, normalise.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), False)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads (0: leave as is), restored afterwards."""
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
