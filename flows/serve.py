"""Serve the deployments ``mme-pipeline/default`` and ``reevaluate/scheduled`` (``make serve``).

Runs in the foreground against the Prefect API in ``$PREFECT_API_URL`` (``make prefect-server``)
and executes their flow runs as subprocesses in this folder; Ctrl-C stops it.

- ``mme-pipeline/default``: parameters = params.yaml's sections as they are when serving
  starts (restart to pick up edits), with the outputs re-rooted under ``runs/prefect/`` so the
  served pipeline never overwrites the DVC pipeline's outputs.
- ``reevaluate/scheduled``: cron ``reevaluate.cron`` (or ``--cron``); reads params.yaml at
  every run, so victims added there are picked up without restarting.

``--pool NAME`` registers the same two deployments on a process work pool instead of serving
them: a ``prefect worker start --pool NAME`` on the GPU host runs their flow runs in this
checkout (docs/scaling.md).
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
    parser.add_argument(
        "--pool", default=None, help="deploy to this process work pool instead of serving"
    )
    parser.add_argument(
        "--working-dir",
        type=Path,
        default=Path.cwd(),
        help="with --pool: the checkout the worker runs the flows in (default: this folder)",
    )
    args = parser.parse_args(argv)
    cron = args.cron or load_section("reevaluate", args.params).cron
    if args.pool:
        deploy_to_pool(args.params, cron, args.pool, args.working_dir)
        return
    serve(*deployments(args.params, cron))


def deploy_to_pool(params: Path, cron: str, pool: str, checkout: Path) -> list[Any]:
    """The two deployments on work pool ``pool``; returns their ids. A worker's flow run imports
    the flows as modules (``flows.pipeline``) in ``checkout``: no image, no remote storage."""
    from prefect import deploy
    from prefect.deployments.runner import EntrypointType

    found = deployments(
        params,
        cron,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"working_dir": str(Path(checkout).resolve())},
    )
    # ignore_warnings: Prefect's hint to `serve` a local process pool instead does not apply
    # to a worker on another (GPU) host
    return deploy(
        *found,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )


def deployments(params: Path, cron: str, **options: Any) -> list[Any]:
    """``mme-pipeline/default`` and ``reevaluate/scheduled`` as served (tests run their
    parameters through the flows); ``options`` go to ``Flow.to_deployment``."""
    # Deployment parameters travel as JSON: dump the pydantic sections.
    pipeline_params = {
        k: v.model_dump(mode="json") if hasattr(v, "model_dump") else str(v)
        for k, v in pipeline_parameters(params).items()
    }
    return [
        mme_pipeline.to_deployment(name="default", parameters=pipeline_params, **options),
        reevaluate.to_deployment(
            name="scheduled", cron=cron, parameters={"params": str(params)}, **options
        ),
    ]


if __name__ == "__main__":
    main()
