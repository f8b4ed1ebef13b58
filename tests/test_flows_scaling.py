"""Prefect tasks with ``poison.nproc`` / ``victim.nproc`` = 2: they start ``torchrun`` (CPU,
gloo) instead of the in-process call, stream its output into the task log, and the stage's
MLflow runs nest in the flow's run as in-process ones do. One real launch (a tiny victim on 16
images); the poison task's launch is checked with a stand-in (``tests/test_distributed.py`` runs
``torchrun -m mme poison`` itself). And the GPU work pool: the deployments registered on a
process pool (``python -m flows.serve --pool``) and one of them run by a worker of that pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from prefect import flow  # noqa: E402

from flows import tasks, torchrun  # noqa: E402
from mme.config import DataConfig, PoisonConfig, VictimConfig  # noqa: E402
from mme.ingest.prepare import prepare  # noqa: E402
from mme.track import tracking  # noqa: E402

EXPERIMENT = "torchrun"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, orchestrated):
    """A Prefect test server, an MLflow store and a 16-image clean set; cwd = root."""
    with orchestrated(tmp_path_factory.mktemp("flows-torchrun")) as root:
        # 4 shards: webdataset hands each rank whole shards
        prepare(
            DataConfig(source="synthetic", out=root / "clean", n_train=16, n_test=4, shard_size=4)
        )
        yield root


@flow(name="two-processes")
def two_processes(victim: VictimConfig, shards: Path) -> tuple[Path, str]:
    """``train_task`` with ``victim.nproc`` = 2, inside a parent MLflow run."""
    from prefect.runtime import flow_run

    with tracking.start_run(EXPERIMENT, "parent", {}, {"stage": "pipeline"}):
        checkpoint = tasks.train_task(victim, shards, Path("runs/two"))
    return checkpoint, flow_run.id


def _flow_log(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(entry.message for entry in logs)


@pytest.mark.slow  # > 30 s on 2 cores (each rank, each flow run imports torch)
def test_a_task_with_two_processes_runs_through_torchrun(env: Path) -> None:
    """One real launch (the costly part: each rank imports torch): the victim trains with DDP,
    its lines are in the task log, its MLflow run is nested in the flow's run."""
    victim = VictimConfig(
        model="mme-tiny-rn", epochs=1, batch_size=8, warmup=1, device="cpu", workers=0, nproc=2
    )
    checkpoint, run_id = two_processes(victim, env / "clean")
    assert checkpoint == Path("runs/two/checkpoint.pt") and checkpoint.is_file()
    assert not (env / "runs" / "two" / "trainer" / "checkpoints").exists()  # finalized

    log = _flow_log(run_id)
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m mme train" in log
    assert "2 process(es)" in log  # a line of `mme train` (rank 0), from the subprocess

    (parent,) = tracking.search_runs("tags.stage = 'pipeline'", EXPERIMENT)
    children = tracking.search_runs(f"tags.mlflow.parentRunId = '{parent['run_id']}'", EXPERIMENT)
    assert [r["run_name"] for r in children] == ["train-two"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_tasks_launch_torchrun_only_above_one_process(monkeypatch, nproc) -> None:
    """poison_task and train_task: nproc 1 calls mme in-process, 2 hands torchrun the same
    section (the poison task's ``clean`` filled in) and the stage's paths."""
    calls = []
    monkeypatch.setattr(tasks.torchrun, "launch", lambda *a: calls.append(("torchrun", *a)))
    monkeypatch.setattr(tasks, "poison", lambda cfg: calls.append(("poison", cfg)))
    monkeypatch.setattr(tasks, "train_victim", lambda *a: calls.append(("train", *a)))
    cfg = PoisonConfig(clean=Path("x"), out=Path("o"), private=Path("p"), nproc=nproc)
    victim = VictimConfig(nproc=nproc)
    tasks.poison_task.fn(cfg, Path("c"))
    tasks.train_task.fn(victim, Path("s"), Path("r"))
    filled = cfg.model_copy(update={"clean": Path("c")})
    if nproc == 1:
        assert calls == [("poison", filled), ("train", victim, Path("s"), Path("r"))]
    else:
        assert calls == [
            ("torchrun", 2, "poison", "poison", filled),
            ("torchrun", 2, "train", "victim", victim, ["--shards", "s", "--run-dir", "r"]),
        ]


def test_a_failed_launch_raises_with_the_output_tail(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with \d+:.*unrecognized arguments: --x"):
        torchrun.launch(2, "train", "victim", VictimConfig(), ["--x"])


@pytest.mark.parametrize(
    "cfg",
    [
        PoisonConfig(
            clean=Path("c"),
            out=Path("o"),
            private=Path("p"),
            nproc=2,
            eot=["jpeg"],
            eot_resize=(0.5, 2),
        ),
        VictimConfig(profile="paper", nproc=2),
    ],
)
def test_the_params_file_gives_back_the_same_section(cfg, tmp_path: Path) -> None:
    """What the child reads from the temporary params file is the task's own config."""
    from mme.config import load_section

    section = "poison" if isinstance(cfg, PoisonConfig) else "victim"
    path = torchrun.write_params(tmp_path / "params.yaml", section, cfg)
    assert load_section(section, path) == cfg


# --- the GPU work pool: deployments on a process pool, a worker runs them ----------------------


def _pool_params(root: Path) -> Path:
    """A params.yaml whose ``reevaluate`` has one tiny victim, already evaluated (below)."""
    victim = {"model": "mme-tiny-rn", "epochs": 1, "batch_size": 8, "device": "cpu"}
    params = {
        "data": {"out": str(root / "clean")},
        "victim": victim,
        "evaluate": {"device": "cpu"},
        "tracking": {"experiment": EXPERIMENT},
        "reevaluate": {
            "protected": str(root / "clean"),
            "clean": str(root / "clean"),
            "runs": str(root / "reevaluate"),
            "victims": [{}],
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow  # > 30 s on 2 cores (each rank, each flow run imports torch)
def test_deployments_on_a_process_pool_run_on_its_worker(env: Path, monkeypatch) -> None:
    """``python -m flows.serve --pool NAME`` registers both deployments on the pool, runnable
    from ``--working-dir``; a process worker of that pool runs ``reevaluate/scheduled`` to
    completion (its victim is already evaluated: the run checks inputs and MLflow, trains
    nothing). The full pipeline on a worker was run by hand (docs/scaling.md): minutes."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    from flows.serve import deploy_to_pool, pipeline_parameters
    from mme.track import report

    params = _pool_params(env)
    victim = VictimConfig(model="mme-tiny-rn", epochs=1, batch_size=8, device="cpu")
    version = report.dataset_version(env / "clean")
    identity = {**report.victim_identity(victim), "data_manifest_sha256": version}
    with tracking.start_run(EXPERIMENT, "evaluate-earlier", identity, {"stage": "evaluate"}):
        tracking.log_metrics({"rsum": 1.0})

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="mme-gpu", type="process",
                                               base_job_template=template))  # fmt: skip
    ids = deploy_to_pool(params, "0 3 * * *", "mme-gpu", env)
    with get_client(sync_client=True) as client:
        found = {d.name: d for d in (client.read_deployment(i) for i in ids)}
    assert set(found) == {"default", "scheduled"}
    for d in found.values():
        assert d.work_pool_name == "mme-gpu" and d.job_variables == {"working_dir": str(env)}
    assert found["default"].entrypoint == "flows.pipeline.mme_pipeline"
    want = pipeline_parameters(params)
    assert found["default"].parameters["victim"] == want["victim"].model_dump(mode="json")

    # the worker's flow run imports `flows` from the checkout; here that is this repository
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run = run_deployment("reevaluate/scheduled", timeout=0)
    asyncio.run(ProcessWorker(work_pool_name="mme-gpu").start(run_once=True))
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), state.message
