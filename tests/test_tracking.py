"""mme.track.tracking: local SQLite store, artifacts inside the store's folder, off switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mme.track import tracking


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One SQLite store per module: creating one runs MLflow's schema migrations (seconds).
    return tmp_path_factory.mktemp("mlflow_store")


@pytest.fixture
def store(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir / 'mlflow.db'}")
    monkeypatch.setenv("MME_TRACKING", "on")
    monkeypatch.chdir(store_dir)
    return store_dir


def _client():
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())


def test_run_params_metrics_artifacts(store: Path) -> None:
    note = store / "note.txt"
    note.write_text("hello")
    params = {"method": "mem", "epsilon": 8, "trigger_len": None, "lr": 5e-4}
    with tracking.start_run("exp-a", "run-1", params, tags={"stage": "test"}) as run_id:
        tracking.log_metrics({"rsum": 12.5, "bad": float("nan"), "name": "x"}, step=0)
        tracking.log_metric_series("train_loss", [0, 5, 10], [3.0, 2.0, 1.0])
        tracking.log_artifact(note)
        tracking.log_dict({"a": 1}, "d.json")
    run = _client().get_run(run_id)
    assert run.info.status == "FINISHED"
    # None dropped; the headline keys also as 0_<key> (they sort first in the UI)
    assert run.data.params == {
        "method": "mem",
        "epsilon": "8",
        "lr": "0.0005",
        "0_method": "mem",
        "0_epsilon": "8",
    }
    assert run.data.metrics == {"rsum": 12.5, "train_loss": 1.0}
    assert run.data.tags["stage"] == "test"
    history = _client().get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (5, 2.0), (10, 1.0)]
    art_dir = store / "mlartifacts" / "exp-a" / run_id / "artifacts"
    assert (art_dir / "note.txt").read_text() == "hello" and (art_dir / "d.json").exists()
    assert not (store / "mlruns").exists()


def test_experiment_reused_and_nested(store: Path) -> None:
    with tracking.start_run("exp-b", "parent", {}) as parent:
        with tracking.start_run("exp-b", "child", {"x": 1}) as child:
            pass
    runs = _client().search_runs([_client().get_experiment_by_name("exp-b").experiment_id])
    assert {r.info.run_id for r in runs} == {parent, child}
    assert _client().get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_failed_body_marks_run_failed(store: Path) -> None:
    with pytest.raises(RuntimeError):
        with tracking.start_run("exp-c", "boom", {}) as run_id:
            raise RuntimeError("boom")
    assert _client().get_run(run_id).info.status == "FAILED"


def test_default_store_is_project_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    expected = (tmp_path / "mlartifacts" / "e").as_uri()
    assert tracking.artifact_location("e") == expected


def test_off_switch_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MME_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.start_run("exp", "r", {"a": 1}) as run_id:
        tracking.log_metrics({"m": 1.0})
        tracking.log_artifact(tmp_path)
    assert run_id is None
    assert not (tmp_path / "mlflow.db").exists()


def test_no_active_run_is_a_no_op(store: Path) -> None:
    tracking.log_metrics({"m": 1.0})
    tracking.log_metric_series("s", [0], [1.0])
    tracking.log_artifact(store)  # would raise inside a run: no run, nothing happens


def test_telemetry_disabled(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    with tracking.start_run("exp-t", "r", {}):
        pass
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"].lower() == "true"


@pytest.mark.parametrize(
    "values, keys, added",
    [
        ({"method": "mem", "lr": 1}, tracking.HEADLINE_PARAMS, {"0_method": "mem"}),
        ({"lr": 1}, tracking.HEADLINE_PARAMS, {}),
        ({"rsum_over_chance": 9.5, "i2t_r1": 3.0}, tracking.HEADLINE_METRICS, None),
    ],
)
def test_with_headline_copies_only_present_keys(values, keys, added) -> None:
    out = tracking.with_headline(values, keys)
    expected = {f"0_{k}": v for k, v in values.items() if k in keys} if added is None else added
    assert out == values | expected
    assert sorted(out)[: len(expected)] == sorted(expected)  # they sort before the rest


def test_headline_columns_and_model_training_kind(store: Path) -> None:
    """Issue 14: the UI opened on the GenAI overview (no runs) with every column hidden."""
    params = {"method": "mem", "epsilon": 8, "victim_model": "tiny", "batch_size": 4}
    with tracking.start_run("exp-kind", "run-h", params) as run_id:
        tracking.log_metrics({"rsum_over_chance": 9.5, "rsum": 60.0})
        tracking.log_metrics({"loss": 1.0}, step=3)  # curves are not headlines
    run = _client().get_run(run_id)
    assert run.data.params["0_method"] == "mem" and run.data.params["0_victim_model"] == "tiny"
    assert "0_batch_size" not in run.data.params
    assert run.data.metrics["0_rsum_over_chance"] == 9.5 and "0_loss" not in run.data.metrics
    exp = _client().get_experiment_by_name("exp-kind")
    assert exp.tags[tracking.KIND_TAG] == "custom_model_development"
    url = tracking.ui_url("http://127.0.0.1:5000/", "exp-kind")
    assert (
        url
        == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?{tracking.UI_MODE}&{tracking.UI_SORT}"
    )


def test_old_experiment_gets_the_kind_tag(store: Path) -> None:
    _client().create_experiment("exp-old")
    assert tracking.KIND_TAG not in _client().get_experiment_by_name("exp-old").tags
    tracking.ui_url("http://h:1", "exp-old")
    tags = _client().get_experiment_by_name("exp-old").tags
    assert tags[tracking.KIND_TAG] == tracking.KIND_TRAINING


def test_ui_url_command_reads_params(store: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    params = store / "p.yaml"
    params.write_text("tracking:\n  experiment: from-params\n")
    assert tracking.main(["ui-url", "--base", "http://x:9", "--params", str(params)]) == 0
    exp = _client().get_experiment_by_name("from-params")
    runs = (
        f"http://x:9/#/experiments/{exp.experiment_id}/runs?{tracking.UI_MODE}&{tracking.UI_SORT}"
    )
    assert capsys.readouterr().out.strip() == runs


def test_report_table_goes_to_the_named_parent(store: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp-parent")
    monkeypatch.setenv("MME_PARENT_RUN", "make-run-20260101-000000")
    with tracking.start_run("exp-parent", "stage", {}):
        pass
    run_id = tracking.log_text_to_parent("| a |\n", "report.md")
    parent = _client().get_run(run_id)
    assert parent.info.run_name == "make-run-20260101-000000"
    assert [a.path for a in _client().list_artifacts(run_id)] == ["report.md"]
    monkeypatch.delenv("MME_PARENT_RUN")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.log_text_to_parent("x", "report.md") is None  # no parent: nothing logged


def test_run_stamp_is_readable_time() -> None:
    import re

    assert re.fullmatch(r"\d{8}-\d{6}", tracking.run_stamp())


def test_a_launched_process_nests_in_the_launchers_run(store: Path, monkeypatch) -> None:
    """child_env() from inside a run; a process started with it (here: the same process once
    the run is no longer active in it) nests its runs there and leaves that run open."""
    with tracking.start_run("exp-launch", "flow", {}) as parent_id:
        env = tracking.child_env()
        assert env[tracking.PARENT_ID_ENV] == parent_id
        assert env["MLFLOW_EXPERIMENT_NAME"] == "exp-launch"
        assert env["MLFLOW_TRACKING_URI"] == tracking.tracking_uri()
        import mlflow

        active = mlflow.active_run()
        mlflow.end_run("RUNNING")  # as seen from the launched process: no active run
        try:
            monkeypatch.setenv(tracking.PARENT_ID_ENV, parent_id)
            with tracking.start_run("elsewhere", "stage", {}) as child_id:
                pass
        finally:
            mlflow.start_run(run_id=active.info.run_id)
        assert _client().get_run(parent_id).info.status == "RUNNING"  # the flow ends it
    child, parent = _client().get_run(child_id), _client().get_run(parent_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.info.experiment_id == parent.info.experiment_id  # the parent's, not "elsewhere"
    assert tracking.child_env().keys() == {"MLFLOW_TRACKING_URI"}  # no active run: no parent
