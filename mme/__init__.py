"""mme — multimodal unlearnable examples (Multi-step Error Minimization, arXiv 2407.16307).

The Python API (see :mod:`mme.app.api`), imported lazily so ``import mme`` stays light::

    import mme

    result = mme.protect("photos/", "publish/")  # prepare -> poison -> verify -> export
    manifest = mme.prepare(source="folder", input="photos/", out="shards/")
    protected = mme.poison(clean="shards/", out="protected/", rounds=5)
    metrics = mme.evaluate("runs/victim/checkpoint.pt", "shards/")
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

_API = {  # callable stage modules (mme.app.api)
    "protect": "mme.app.protect",
    "prepare": "mme.ingest.prepare",
    "poison": "mme.protection.poison",
    "evaluate": "mme.victim.evaluate",
}
_NAMES = {
    "DataConfig": "mme.config",
    "PoisonConfig": "mme.config",
    "EvaluateConfig": "mme.config",
    "ProtectConfig": "mme.app.protect",
    "ProtectResult": "mme.app.protect",
    "Manifest": "mme.manifest",
    "read_manifest": "mme.manifest",
    "RetrievalMetrics": "mme.app.api",
}
__all__ = ["__version__", *_API, *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _API:
        if name in ("protect", "poison") and "torch" not in sys.modules:
            # poison.cpu_isa's default pin must precede torch's import (mme/cpuisa.py)
            importlib.import_module("mme.cpuisa").pin("avx2")
        return importlib.import_module(_API[name])
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'mme' has no attribute {name!r}")
