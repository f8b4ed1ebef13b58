"""Flow ``mme-pipeline``: prepare -> poison -> train (clean, protected) -> evaluate -> report.

The same stages as ``dvc.yaml``, as Prefect tasks, in one MLflow parent run (experiment =
``experiment``, the dataset) with a nested run per stage. Parameters are the params.yaml
sections; ``flows/serve.py`` deploys it as ``mme-pipeline/default``. Run it once directly with
``python -m flows.pipeline`` (params.yaml's sections, outputs under ``runs/prefect``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.tasks import (
    PREFECT_ROOT,
    evaluate_task,
    pipeline_parameters,
    poison_task,
    prepare_task,
    report_task,
    run_params,
    train_task,
)
from mme import __version__, paths
from mme.config import DataConfig, EvaluateConfig, PoisonConfig, VictimConfig
from mme.track import tracking


@flow(name="mme-pipeline", log_prints=True)
def mme_pipeline(
    data: DataConfig,
    poison: PoisonConfig,
    victim: VictimConfig,
    evaluate: EvaluateConfig,
    runs: Path = PREFECT_ROOT,
    experiment: str = "mme",
) -> dict[str, dict[str, float]]:
    """Protect ``data`` with ``poison``, train ``victim`` on the clean and on the protected
    set (run folders under ``runs``), evaluate both on the clean test split; returns
    ``{"clean": metrics, <method>: metrics}`` and prints the comparison table."""
    tags = {"stage": "pipeline", "orchestrator": "prefect", "prefect_flow_run": flow_run.name}
    name = f"pipeline-{__version__}-{tracking.run_stamp()}"  # unique and readable
    with tracking.start_run(experiment, name, run_params(poison, victim), tags):
        clean = prepare_task(data)
        protected = poison_task(poison, clean)
        # victims/: never the folder that holds the protected sets (runs/protected/<method>)
        clean_ckpt = train_task(victim, clean, runs / "victims" / "clean")
        protected_ckpt = train_task(victim, protected, runs / "victims" / "protected")
        results = {
            "clean": evaluate_task(evaluate, clean_ckpt, clean),
            poison.method: evaluate_task(evaluate, protected_ckpt, clean),
        }
        table = report_task(experiment, [clean, protected])
        tracking.log_text(table + "\n", "report.md")  # the table, with the runs it sums up
    return results


if __name__ == "__main__":
    mme_pipeline(**pipeline_parameters(paths.PARAMS))
