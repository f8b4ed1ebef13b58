"""Default paths of the pipeline's folders: the one place they are spelled out.

``params.yaml``, the config models and the CLI all take their defaults from here. Public
folders (what may be published) and private ones (what must never be) are kept apart by name.
"""

from __future__ import annotations

from pathlib import Path

CLEAN = Path("data/shards/synthetic")  # mme prepare's output: the clean shards (private)
PROTECTED = Path("data/protected/mem")  # mme poison's PUBLIC output: protected shards + manifest
PRIVATE = Path("data/private/mem")  # mme poison's PRIVATE output: noise, triggers, grid, work
REEVALUATE_RUNS = Path("runs/reevaluate")
