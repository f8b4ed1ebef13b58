"""Prefect flows on a tiny config, under ``prefect_test_harness``, tracked in a temporary MLflow
store: the pipeline (nested runs, result cache) and ``reevaluate`` (skips evaluated victims,
evaluates a newly added one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from mme.config import DataConfig, EvaluateConfig, PoisonConfig, VictimConfig  # noqa: E402
from mme.track import tracking  # noqa: E402

EXPERIMENT = "tiny"
TINY_POISON = dict(rounds=1, surrogate_steps=1, batch_size=8, pgd_steps=1, trigger_rounds=1)
TINY_VICTIM = dict(model="mme-tiny-vit", epochs=1, batch_size=8, warmup=1, device="cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, orchestrated):
    """A Prefect test server + PREFECT_HOME and an MLflow store, all temporary; cwd = root."""
    with orchestrated(tmp_path_factory.mktemp("flows")) as root:
        yield root


def _pipeline_args(root: Path) -> dict:
    clean, protected = root / "shards" / "tiny", root / "protected" / "mem"
    return {
        "data": DataConfig(out=clean, n_train=16, n_test=8),
        "poison": PoisonConfig(
            clean=clean,
            out=protected,
            private=root / "private" / "mem",
            device="cpu",
            **TINY_POISON,
        ),
        "victim": VictimConfig(**TINY_VICTIM),
        "evaluate": EvaluateConfig(device="cpu"),
        "runs": root / "runs",
        "experiment": EXPERIMENT,
    }


def _runs(stage: str) -> list[dict]:
    return tracking.search_runs(f"tags.stage = '{stage}'", EXPERIMENT)


@pytest.fixture(scope="module")
def pipeline_result(env: Path) -> dict:
    from flows.pipeline import mme_pipeline

    return mme_pipeline(**_pipeline_args(env))


def test_pipeline_runs_and_nests_stage_runs(env: Path, pipeline_result: dict) -> None:
    assert set(pipeline_result) == {"clean", "mem"}
    assert all(m["n_images"] == 8 for m in pipeline_result.values())
    assert (env / "protected" / "mem" / "manifest.json").exists()
    (parent,) = _runs("pipeline")
    assert (
        parent["params"]["method"] == "mem" and parent["params"]["victim_model"] == "mme-tiny-vit"
    )
    children = tracking.search_runs(f"tags.mlflow.parentRunId = '{parent['run_id']}'", EXPERIMENT)
    names = sorted(r["run_name"] for r in children)
    assert names == [
        "evaluate-clean",
        "evaluate-protected",
        "poison-mem",
        "train-clean",
        "train-protected",
    ]


def test_pipeline_rerun_is_served_from_cache(env: Path, pipeline_result: dict) -> None:
    from flows.pipeline import mme_pipeline

    again = mme_pipeline(**_pipeline_args(env))
    assert again == pipeline_result
    assert len(_runs("pipeline")) == 2
    assert len(_runs("train")) == 2 and len(_runs("evaluate")) == 2  # nothing re-ran


def _write_params(root: Path, victims: list[dict]) -> Path:
    args = _pipeline_args(root)
    params = {
        "victim": TINY_VICTIM,
        "evaluate": {"device": "cpu"},
        "tracking": {"experiment": EXPERIMENT},
        "reevaluate": {
            "protected": str(args["poison"].out),
            "clean": str(args["data"].out),
            "runs": str(root / "reevaluate"),
            "victims": victims,
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_reevaluate_skips_evaluated_and_runs_new_victims(env: Path, pipeline_result: dict) -> None:
    from flows.reevaluate import reevaluate

    # The pipeline already evaluated its own victim ({}) on this dataset version.
    params = _write_params(env, [{}])
    n_train = len(_runs("train"))
    reevaluate(params=params)
    assert len(_runs("train")) == n_train

    params = _write_params(env, [{}, {"model": "mme-tiny-rn"}])
    table = reevaluate(params=params)
    new = _runs("train")[: len(_runs("train")) - n_train]
    assert [r["params"]["victim_model"] for r in new] == ["mme-tiny-rn"]
    assert "mme-tiny-rn" in table and "mme-tiny-vit" in table
    parents = _runs("reevaluate")
    assert [p["params"]["n_new"] for p in parents] == ["1", "0"]  # newest first

    reevaluate(params=params)  # nothing left to do
    assert len(_runs("train")) == n_train + 1


def test_readme_prefect_sequence(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14, the README's Prefect sequence in a fresh folder with a tiny params.yaml: the
    served ``mme-pipeline/default`` (its deployment's JSON parameters), then
    ``reevaluate/scheduled`` with its default parameters (it failed: its defaults pointed at
    the DVC pipeline's outputs), then again with a second victim in params.yaml."""
    from flows.pipeline import mme_pipeline
    from flows.reevaluate import reevaluate
    from flows.serve import deployments

    clone = env / "clone"
    clone.mkdir()
    monkeypatch.chdir(clone)
    params = {
        "data": {"out": "data/shards/tiny", "n_train": 16, "n_test": 8},
        "poison": {**TINY_POISON, "device": "cpu"},
        "victim": TINY_VICTIM,
        "evaluate": {"device": "cpu"},
        "tracking": {"experiment": "readme"},
        "reevaluate": {"victims": [{}]},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    pipeline, scheduled = deployments(Path("params.yaml"), "0 3 * * *")
    assert (pipeline.flow_name, pipeline.name) == ("mme-pipeline", "default")
    assert (scheduled.flow_name, scheduled.name) == ("reevaluate", "scheduled")
    assert scheduled.parameters == {"params": "params.yaml"}

    results = mme_pipeline(**pipeline.parameters)  # 'mme-pipeline/default'
    assert set(results) == {"clean", "mem"}
    trained = tracking.search_runs("tags.stage = 'train'", "readme")
    table = reevaluate(**scheduled.parameters)  # 'reevaluate/scheduled', defaults
    assert len(tracking.search_runs("tags.stage = 'train'", "readme")) == len(trained)
    assert "mme-tiny-vit" in table

    params["reevaluate"]["victims"] = [{}, {"model": "mme-tiny-rn"}]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    table = reevaluate(**scheduled.parameters)
    new = tracking.search_runs("tags.stage = 'train'", "readme")[:1]
    assert [r["params"]["victim_model"] for r in new] == ["mme-tiny-rn"]
    assert "mme-tiny-rn" in table and "mme-tiny-vit" in table
    parents = tracking.search_runs("tags.stage = 'reevaluate'", "readme")
    assert len({p["run_name"] for p in parents}) == 2  # unique names (data version + time)
    (pipeline_run,) = tracking.search_runs("tags.stage = 'pipeline'", "readme")
    assert pipeline_run["run_name"].startswith("pipeline-")
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    for run in (pipeline_run, parents[0]):
        assert [a.path for a in client.list_artifacts(run["run_id"])] == ["report.md"]


def test_reevaluate_checks_every_input_first(env: Path, tmp_path: Path) -> None:
    """Every problem in one message, in the flow run's state, before any training."""
    from flows.reevaluate import reevaluate
    from mme import shards

    train_only = tmp_path / "train-only"  # a clean set prepared without a test split
    shards.write_json_atomic(
        train_only / "manifest.json", {"splits": {"train": {"images": 4}, "test": {"images": 0}}}
    )
    n_train = len(_runs("train"))
    state = reevaluate(
        params=_write_params(env, [{}]),
        protected=tmp_path / "nothing",
        clean=train_only,
        victims=[VictimConfig(**{**TINY_VICTIM, "model": "no-such-model"})],
        return_state=True,
    )
    assert state.is_failed()
    for needle in ("no manifest.json", "no test split", "no-such-model"):
        assert needle in state.message
    assert len(_runs("train")) == n_train


def test_reevaluate_defaults_follow_the_newest_pipeline_output(tmp_path: Path, monkeypatch) -> None:
    import json
    import os

    from flows.tasks import plan_task

    monkeypatch.chdir(tmp_path)
    params = {
        "data": {"out": "data/shards/syn"},
        "poison": {"method": "mem"},
        "reevaluate": {"protected": "data/protected/mem", "clean": "data/shards/syn"},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    dvc_made, prefect_made = Path("data/protected/mem"), Path("runs/prefect/protected/mem")
    for folder, clean in ((dvc_made, "data/shards/syn"), (prefect_made, "runs/prefect/shards/syn")):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"clean": clean}))

    def plan(**kw):
        args = {"protected": None, "clean": None, "rev": None, "victims": [], **kw}
        return plan_task.fn(Path("params.yaml"), **args).cfg

    os.utime(dvc_made / "manifest.json", (1, 1))  # the Prefect pipeline ran last
    cfg = plan()
    assert (cfg.protected, cfg.clean) == (prefect_made, Path("runs/prefect/shards/syn"))
    os.utime(prefect_made / "manifest.json", (0, 0))  # now the DVC pipeline's is newer
    cfg = plan()
    assert (cfg.protected, cfg.clean) == (dvc_made, Path("data/shards/syn"))
    cfg = plan(protected=prefect_made, clean=Path("elsewhere"))  # parameters win
    assert (cfg.protected, cfg.clean) == (prefect_made, Path("elsewhere"))


def test_trainer_lines_reach_the_task_log_once(env: Path, pipeline_result: dict) -> None:
    """The trainer's lines are in each train task run's log in the Prefect API, once each, and
    without open_clip_train's model printout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the logs are sent in the background
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_task_runs() if r.name.startswith("train-")]
        runs = [r for r in runs if r.state_name != "Cached"]  # cache hits train nothing
        assert runs
        for run in runs:
            log_filter = LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id]))
            messages = [log.message for log in client.read_logs(log_filter=log_filter)]
            trainer = [m for m in messages if m.startswith("Train Epoch: 0")]
            assert trainer, messages[-20:]
            assert len(trainer) == len(set(trainer))  # once
            assert not any("VisionTransformer(" in m or m == "Model:" for m in messages)
