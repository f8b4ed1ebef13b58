"""Default paths of the pipeline's folders: the one place they are spelled out.

``params.yaml``, the config models, the CLI and the flows all take their defaults from here. Public
folders (what may be published) and private ones (what must never be) are kept apart by name.
"""

from __future__ import annotations

from pathlib import Path

CLEAN = Path("data/shards/synthetic")  # mme prepare's output: the clean shards (private)
PROTECTED = Path("data/protected/mem")  # mme poison's PUBLIC output: protected shards + manifest
PRIVATE = Path("data/private/mem")  # mme poison's PRIVATE output: noise, triggers, grid, work
REEVALUATE_RUNS = Path("runs/reevaluate")
PARAMS = Path("params.yaml")  # the settings every command reads (built-in defaults without it)
ATTACKED = Path("data/attacked")  # mme attack's outputs: ATTACKED/<slug of the transform>
RUNS = Path("runs")  # run folders: mme train's victims, where mme report --html finds loss curves
PREFECT_RUNS = Path("runs/prefect")  # the served Prefect pipeline's outputs, never DVC's


def victim_run(shard_dir: Path | str) -> Path:
    """``mme train``'s run folder for ``shard_dir`` (and ``mme evaluate``'s checkpoint's)."""
    return RUNS / f"victim-{Path(shard_dir).name}"


def private_for(public: Path | str) -> Path:
    """``mme poison``'s default private folder for the public folder ``public``:
    ``data/private/<its name>`` (``data/protected/mem`` -> ``data/private/mem``)."""
    return PRIVATE.parent / Path(public).name
