"""Serve the deployments ``mme-pipeline/default`` and ``reevaluate/scheduled`` (``make serve``).

Runs in the foreground against the Prefect API in ``$PREFECT_API_URL`` (``make prefect-server``)
and executes their flow runs as subprocesses in this folder; Ctrl-C stops it.

- ``mme-pipeline/default``: parameters = params.yaml's sections as they are when serving
  starts (restart to pick up edits), with the outputs re-rooted under ``runs/prefect/`` so the
  served pipeline never overwrites the DVC pipeline's outputs.
- ``reevaluate/scheduled``: cron ``reevaluate.cron`` (or ``--cron``); reads params.yaml at
  every run, so victims added there are picked up without restarting.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import serve

from flows.pipeline import mme_pipeline
from flows.reevaluate import reevaluate
from mme.config import load_section

PREFECT_ROOT = Path("runs/prefect")


def pipeline_parameters(params: Path, root: Path = PREFECT_ROOT) -> dict[str, Any]:
    """``mme_pipeline``'s parameters from ``params``, outputs under ``root``."""
    data = load_section("data", params)
    poison = load_section("poison", params)
    data = data.model_copy(update={"out": root / "shards" / Path(data.out).name})
    poison = poison.model_copy(
        update={
            "clean": data.out,
            "out": root / "protected" / poison.method,
            "private": root / "private" / poison.method,
        }
    )
    return {
        "data": data,
        "poison": poison,
        "victim": load_section("victim", params),
        "evaluate": load_section("evaluate", params),
        "runs": root,
        "experiment": load_section("tracking", params).experiment,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cron", default=None, help="reevaluate schedule (default: params.yaml)")
    args = parser.parse_args(argv)
    cron = args.cron or load_section("reevaluate", args.params).cron
    # Deployment parameters travel as JSON: dump the pydantic sections.
    pipeline_params = {
        k: v.model_dump(mode="json") if hasattr(v, "model_dump") else str(v)
        for k, v in pipeline_parameters(args.params).items()
    }
    serve(
        mme_pipeline.to_deployment(name="default", parameters=pipeline_params),
        reevaluate.to_deployment(
            name="scheduled", cron=cron, parameters={"params": str(args.params)}
        ),
    )


if __name__ == "__main__":
    main()
