"""Experiment tracking: the only module that imports MLflow (lazily, inside functions).

Store: ``MLFLOW_TRACKING_URI`` if set, else a local SQLite file ``./mlflow.db`` (relative to the
working directory, i.e. the project). For any SQLite store, artifacts go to
``mlartifacts/<experiment>`` next to the ``.db`` file: the artifact location is set explicitly when
an experiment is created, so artifacts never land in MLflow's default ``./mlruns``.
``MLFLOW_EXPERIMENT_NAME`` overrides the experiment (default ``mme``, shared by all stages).
``MME_TRACKING=off`` turns every function here into a no-op (unit tests, or machines without
MLflow). MLflow's usage telemetry is always disabled.

Runs use the same parameter names across stages: ``method``, ``epsilon``, ``trigger_len``,
``victim_model``, ``epochs``, ``batch_size``, ``lr``, ``data_manifest_sha256``.

Headline columns: the few keys a reader compares first (:data:`HEADLINE_METRICS`,
:data:`HEADLINE_PARAMS`) are logged a second time as ``0_<key>``, so they sort before the ~70
others in the MLflow UI's column chooser (docs/orchestration.md shows how to pin them).
Experiments are created in MLflow's "model training" mode (tag ``mlflow.experimentKind``), so
the UI opens on the runs table, not the GenAI overview.

Parent runs: inside an active run (a Prefect flow's pipeline run) a new run is nested in it, in
the parent's experiment. Across processes (DVC runs each stage as its own command)
``$MME_PARENT_RUN`` (else ``$DVC_EXP_NAME``, which ``dvc exp run`` sets) names a parent run: the
first stage creates it in the experiment, later stages find it by its ``mme.parent`` tag.
A process launched from inside a run (a Prefect task starting ``torchrun``) gets that run's id
in ``$MME_PARENT_RUN_ID`` (:func:`child_env`), and its runs nest in it as they would in-process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "mme"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PARAM_NAMES = (
    "method",
    "epsilon",
    "trigger_len",
    "victim_model",
    "epochs",
    "batch_size",
    "lr",
    "data_manifest_sha256",
)
PARENT_TAG = "mme.parent"
PARENT_ID_ENV = "MME_PARENT_RUN_ID"  # set by child_env() for a launched process
HEADLINE_PREFIX = "0_"  # digits sort before letters in MLflow's (locale) column ordering
HEADLINE_METRICS = ("rsum_over_chance", "i2t_r1", "t2i_r1")
HEADLINE_PARAMS = ("method", "epsilon", "trigger_len", "victim_model", "attack")
# MLflow 3's experiment kinds (mlflow/server/js: GENAI_DEVELOPMENT, CUSTOM_MODEL_DEVELOPMENT);
# without the tag the UI guesses and may open the GenAI "Overview", which lists no runs.
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"
# The UI's global GenAI / "Model training" switch is read from this URL parameter (else from
# the browser's local storage, GenAI by default).
UI_MODE = "workflowType=machine_learning"
UI_SORT = "orderByKey=metrics.%600_rsum_over_chance%60&orderByAsc=false"  # best victim first


def with_headline(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``values`` plus a ``0_<key>`` copy of each headline key present (sorts first in the UI)."""
    return values | {HEADLINE_PREFIX + k: values[k] for k in keys if k in values}


def enabled() -> bool:
    """False when ``MME_TRACKING`` is ``off``/``0``/``false``/``no``, or MLflow is not installed."""
    if os.environ.get("MME_TRACKING", "on").strip().lower() in {"off", "0", "false", "no"}:
        return False
    return mlflow_installed()


_missing_noted: list[bool] = []


def mlflow_installed() -> bool:
    """Whether MLflow can be imported (the ``ops`` extra); says once when it cannot."""
    import importlib.util

    try:
        found = sys.modules.get("mlflow", True) is not None and bool(
            importlib.util.find_spec("mlflow")
        )
    except (ImportError, ValueError):
        found = False
    if not found and not _missing_noted:
        _missing_noted.append(True)
        print(
            "mme: MLflow is not installed: tracking is off "
            "(pip install 'mme[ops]' to turn it on; MME_TRACKING=off hides this line)",
            file=sys.stderr,
        )
    return found


def experiment_name() -> str:
    """``$MLFLOW_EXPERIMENT_NAME`` or ``mme``: all stages log into one experiment."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def _mlflow():
    """Import MLflow with telemetry off and the tracking URI set."""
    # Set before the import: telemetry reads these at import / first-call time.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _experiment_id(mlflow: Any, name: str) -> str:
    """Id of experiment ``name`` (created if missing), marked as a model-training experiment."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(
            name, artifact_location=artifact_location(name), tags={KIND_TAG: KIND_TRAINING}
        )
    if KIND_TAG not in exp.tags:  # created before this tag existed, or by another tool
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, KIND_TRAINING)
    return exp.experiment_id


def ui_url(base: str, experiment: str) -> str:
    """The runs table of ``experiment`` in the MLflow UI served at ``base`` (created if new)."""
    exp_id = _experiment_id(_mlflow(), experiment)
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{UI_MODE}&{UI_SORT}"


def artifact_location(experiment: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/<experiment>`` next to the ``.db`` file.

    Without this MLflow would write them to ``./mlruns`` of whatever the cwd is. Other stores
    (a tracking server) keep their own artifact default (``None``).
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.resolve().parent / DEFAULT_ARTIFACTS / experiment).as_uri()


def _clean_params(params: dict[str, Any]) -> dict[str, str]:
    # MLflow params are strings; None means "not applicable" and is dropped, not logged as "None".
    return {k: str(v) for k, v in params.items() if v is not None}


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    nested: bool = False,
) -> Iterator[str | None]:
    """Open an MLflow run in ``experiment`` (created if missing) and log ``params`` and ``tags``.

    Yields the run id (``None`` when tracking is off). The run ends FAILED if the body raises.
    Inside another active run (e.g. a pipeline's parent run) the new run is nested in it.
    """
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    active = mlflow.active_run()
    parent_id = launcher_id = None
    if active is not None:
        # MLflow only shows nesting within one experiment: a child joins its parent's.
        exp_id, nested = active.info.experiment_id, True
    elif os.environ.get(PARENT_ID_ENV):  # the launching process's active run (child_env)
        launcher_id = os.environ[PARENT_ID_ENV]
        exp_id = mlflow.get_run(launcher_id).info.experiment_id
    else:
        exp_id = _experiment_id(mlflow, experiment)
        parent_id = _named_parent(mlflow, exp_id)
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=run_name,
        nested=nested,
        parent_run_id=parent_id or launcher_id,
    ) as run:
        status = "FAILED"
        try:
            mlflow.log_params(_clean_params(with_headline(params, HEADLINE_PARAMS)))
            if tags:
                mlflow.set_tags({k: str(v) for k, v in tags.items()})
            yield run.info.run_id
            status = "FINISHED"
        finally:
            if parent_id is not None:  # the parent spans its children: ends with the latest
                mlflow.MlflowClient().set_terminated(parent_id, status)


def child_env() -> dict[str, str]:
    """Environment for a process launched from here (``torchrun -m mme ...``) whose runs must
    land where an in-process call's would: the same store, nested in the active run."""
    if not enabled():
        return {}
    mlflow = _mlflow()
    env = {"MLFLOW_TRACKING_URI": tracking_uri()}
    active = mlflow.active_run()
    if active is not None:
        env[PARENT_ID_ENV] = active.info.run_id
        env["MLFLOW_EXPERIMENT_NAME"] = mlflow.get_experiment(active.info.experiment_id).name
    return env


def parent_run_name() -> str | None:
    """The cross-process parent run's name: ``$MME_PARENT_RUN``, else ``$DVC_EXP_NAME``."""
    return os.environ.get("MME_PARENT_RUN") or os.environ.get("DVC_EXP_NAME") or None


def run_stamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS``: parent-run names are unique and sort by time."""
    return time.strftime("%Y%m%d-%H%M%S")


def log_text_to_parent(text: str, name: str) -> str | None:
    """Store ``text`` as artifact ``name`` of the named cross-process parent run (the DVC
    pipeline's, see :func:`parent_run_name`) in :func:`experiment_name`; returns its run id,
    None when there is no such parent or tracking is off."""
    if not enabled() or not parent_run_name():
        return None
    mlflow = _mlflow()
    run_id = _named_parent(mlflow, _experiment_id(mlflow, experiment_name()))
    mlflow.MlflowClient().log_text(run_id, text, name)
    return run_id


def _named_parent(mlflow: Any, exp_id: str) -> str | None:
    """Id of the run tagged ``mme.parent = parent_run_name()`` in ``exp_id`` (created if new)."""
    name = parent_run_name()
    if not name:
        return None
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {PARENT_TAG: name, "stage": "pipeline", "mlflow.runName": name}
    return client.create_run(exp_id, tags=tags, run_name=name).info.run_id


def search_runs(filter_string: str = "", experiment: str | None = None) -> list[dict[str, Any]]:
    """Finished runs matching an MLflow ``filter_string`` in ``experiment`` (None: all), newest
    first, as plain dicts ``{run_id, run_name, experiment, start_time, params, metrics, tags}``.

    Empty when tracking is off or the experiment does not exist.
    """
    if not enabled():
        return []
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    if experiment is None:
        experiments = client.search_experiments()
    else:
        exp = client.get_experiment_by_name(experiment)
        experiments = [exp] if exp is not None else []
    if not experiments:
        return []
    names = {e.experiment_id: e.name for e in experiments}
    status = "attributes.status = 'FINISHED'"
    runs = mlflow.search_runs(
        experiment_ids=list(names),
        filter_string=f"{filter_string} and {status}" if filter_string else status,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "experiment": names.get(r.info.experiment_id, r.info.experiment_id),
            "start_time": r.info.start_time,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
        }
        for r in runs
    ]


def _active() -> Any | None:
    """The mlflow module if tracking is on and a run is active, else None."""
    if not enabled():
        return None
    mlflow = _mlflow()
    return mlflow if mlflow.active_run() is not None else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run (non-numeric values are skipped)."""
    mlflow = _active()
    if mlflow is None:
        return
    clean = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v
    }  # v == v drops NaN
    if step is None:  # summaries only: a per-step curve is not a headline
        clean = with_headline(clean, HEADLINE_METRICS)
    mlflow.log_metrics(clean, step=step)


def log_metric_series(name: str, steps: list[int], values: list[float]) -> None:
    """Log a whole series (e.g. a parsed training-loss curve) in batches."""
    mlflow = _active()
    if mlflow is None or not steps:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, float(v), now, int(s)) for s, v in zip(steps, values, strict=True)]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Copy a file (or a whole folder) into the active run's artifacts."""
    mlflow = _active()
    if mlflow is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: dict[str, Any], name: str) -> None:
    """Store ``obj`` as a JSON/YAML artifact ``name`` of the active run."""
    mlflow = _active()
    if mlflow is not None:
        mlflow.log_dict(obj, name)


def log_text(text: str, name: str) -> None:
    """Store ``text`` as an artifact file ``name`` of the active run."""
    mlflow = _active()
    if mlflow is not None:
        mlflow.log_text(text, name)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow = _active()
    if mlflow is not None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def main(argv: list[str] | None = None) -> int:
    """``python -m mme.track.tracking ui-url``: the runs view of params.yaml's experiment
    (``make mlflow-ui`` prints and opens it)."""
    import argparse

    from mme import paths
    from mme.config import load_section

    parser = argparse.ArgumentParser(prog="python -m mme.track.tracking")
    parser.add_argument("command", choices=["ui-url"])
    parser.add_argument("--base", default="http://127.0.0.1:5000", help="where the UI is served")
    parser.add_argument("--params", type=Path, default=paths.PARAMS)
    args = parser.parse_args(argv)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or (
        load_section("tracking", args.params).experiment
    )
    print(ui_url(args.base, experiment))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
