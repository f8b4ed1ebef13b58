"""Flow ``reevaluate``: check a published protected dataset against (new) victim models.

Given the protected set (a folder, or its path at a git/DVC revision) and the victims listed in
params.yaml (``reevaluate.victims``, read when the run starts, so a victim added to the file
is picked up by the next scheduled run), it trains and evaluates every victim that has no
``evaluate`` result for that dataset version in MLflow yet, and returns the updated table.
``flows/serve.py`` deploys it as ``reevaluate/scheduled`` (cron ``reevaluate.cron``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.tasks import (
    check_task,
    evaluate_uncached,
    fetch_task,
    pending_task,
    plan_task,
    reevaluate_params,
    report_task,
    train_uncached,
    version_task,
)
from mme import paths
from mme.config import VictimConfig
from mme.track import tracking


@flow(name="reevaluate", log_prints=True)
def reevaluate(
    params: Path = paths.PARAMS,
    protected: Path | None = None,
    clean: Path | None = None,
    rev: str | None = None,
    victims: list[VictimConfig] | None = None,
) -> str:
    """Train + evaluate the victims of ``params`` (or ``victims``) not yet evaluated on the
    protected set, judged on ``clean``'s test split. Unset, ``protected`` is the newest of the
    DVC and the Prefect pipeline's outputs and ``clean`` the set it was made from (see
    :func:`flows.tasks.plan_task`). Every input is checked before any training; the first
    problem list is the flow run's failure message. Returns the Markdown table."""
    plan = plan_task(params, protected, clean, rev, victims)
    dataset = fetch_task(plan.cfg.protected, plan.cfg.rev, plan.cfg.runs)
    check_task(dataset, plan)
    version = version_task(dataset)
    todo = pending_task(version, plan.victims, plan.experiment, plan.cfg.runs)
    run_name = f"reevaluate-{version[:8]}-{tracking.run_stamp()}"  # unique, readable
    params_ = reevaluate_params(version, plan, len(todo))
    with tracking.start_run(plan.experiment, run_name, params_, {"stage": "reevaluate"}):
        for victim, run_dir in todo:
            checkpoint = train_uncached(victim, dataset, run_dir)
            evaluate_uncached(plan.evaluate, checkpoint, plan.cfg.clean)
        table = report_task(plan.experiment, [dataset])
        tracking.log_text(table + "\n", "report.md")
    return table


if __name__ == "__main__":
    reevaluate()
