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
from flows.tasks import pipeline_parameters
from mme import paths
from mme.config import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=paths.PARAMS)
    parser.add_argument("--cron", default=None, help="reevaluate schedule (default: params.yaml)")
    args = parser.parse_args(argv)
    cron = args.cron or load_section("reevaluate", args.params).cron
    serve(*deployments(args.params, cron))


def deployments(params: Path, cron: str) -> list[Any]:
    """``mme-pipeline/default`` and ``reevaluate/scheduled`` as served (tests run their
    parameters through the flows)."""
    # Deployment parameters travel as JSON: dump the pydantic sections.
    pipeline_params = {
        k: v.model_dump(mode="json") if hasattr(v, "model_dump") else str(v)
        for k, v in pipeline_parameters(params).items()
    }
    return [
        mme_pipeline.to_deployment(name="default", parameters=pipeline_params),
        reevaluate.to_deployment(name="scheduled", cron=cron, parameters={"params": str(params)}),
    ]


if __name__ == "__main__":
    main()
