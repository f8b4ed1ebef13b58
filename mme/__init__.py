"""mme — multimodal unlearnable examples (Multi-step Error Minimization, arXiv 2407.16307).

The Python API (see :mod:`mme.app.api`), imported lazily so ``import mme`` stays light::

    import mme

    result = mme.protect("photos/", "publish/")  # prepare -> poison -> verify -> export
    manifest = mme.prepare(source="folder", input="photos/", out="shards/")
    protected = mme.poison(clean="shards/", out="protected/", rounds=5)
    metrics = mme.evaluate("runs/victim/checkpoint.pt", "shards/")

The package root imports nothing of mme when it loads (every name below is resolved on first
use), so any module may read ``mme.__version__`` without pulling in the app.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

_API = ("protect", "prepare", "poison", "evaluate")  # functions of mme.app.api
_NAMES = {
    "DataConfig": "mme.config",
    "PoisonConfig": "mme.config",
    "EvaluateConfig": "mme.config",
    "ProtectConfig": "mme.app.settings",
    "ProtectResult": "mme.app.settings",
    "Manifest": "mme.manifest",
    "read_manifest": "mme.manifest",
    "RetrievalMetrics": "mme.app.api",
}
__all__ = ["__version__", *_API, *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _API:
        if "torch" not in sys.modules:  # the environment torch reads once, when it loads
            isa = "avx2" if name in ("protect", "poison") else None  # poison.cpu_isa's default
            importlib.import_module("mme.env").prepare_process_env(isa)
        return getattr(importlib.import_module("mme.app.api"), name)
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'mme' has no attribute {name!r}")
