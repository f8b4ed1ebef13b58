"""Prefect tasks: thin typed wrappers of the ``mme`` stage functions, shared by the flows.

Caching. A task's result is reused when its cache key matches an earlier run's: the key hashes
the task's source code, its configuration and the *content* of its inputs (an input dataset's
version, :func:`mme.shards.manifest_sha256`; the sha256 of a checkpoint file, of the CSVs of a
csv source), so a changed upstream dataset re-runs everything downstream even at the same path.
Outputs live on disk: after deleting them, run once with ``PREFECT_TASKS_REFRESH_CACHE=true``.

Retries: only on the tasks that do I/O that can fail transiently (reading the input dataset,
``dvc get``, the MLflow store); a failed poison or training run would fail again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.logging.handlers import APILogHandler
from pydantic import BaseModel

from flows import torchrun
from flows.results import PlainJSON, PlainRecordsOnly
from mme import models, paths, shards
from mme.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    PoisonConfig,
    ReevaluateConfig,
    VictimConfig,
    load_section,
    reevaluation_victims,
)
from mme.ingest.prepare import prepare
from mme.protection.poison import poison
from mme.track import report
from mme.victim.evaluate import evaluate_and_log
from mme.victim.train import train_victim

IO_RETRIES = {"retries": 2, "retry_delay_seconds": 10}
PREFECT_ROOT = paths.PREFECT_RUNS  # the served pipeline's outputs (never the DVC pipeline's)


def prefect_outputs(params: Path, root: Path = PREFECT_ROOT) -> tuple[DataConfig, PoisonConfig]:
    """params.yaml's ``data``/``poison`` sections re-rooted under ``root``: where
    ``mme-pipeline/default`` writes its clean and protected sets."""
    data = load_section("data", params)
    data = data.model_copy(update={"out": root / "shards" / Path(data.out).name})
    poison_cfg = load_section("poison", params)
    poison_cfg = poison_cfg.model_copy(
        update={
            "clean": data.out,
            "out": root / "protected" / poison_cfg.method,
            "private": root / "private" / poison_cfg.method,
        }
    )
    return data, poison_cfg


def pipeline_parameters(params: Path, root: Path = PREFECT_ROOT) -> dict[str, Any]:
    """``mme_pipeline``'s parameters (flows/pipeline.py) from ``params``, outputs under ``root``."""
    data, poison = prefect_outputs(params, root)
    return {
        "data": data,
        "poison": poison,
        "victim": load_section("victim", params),
        "evaluate": load_section("evaluate", params),
        "runs": root,
        "experiment": load_section("tracking", params).experiment,
    }


# --- cache keys --------------------------------------------------------------------------------


def _file_sha256(path: Path | None) -> str | None:
    return shards.sha256_file(Path(path)) if path is not None and Path(path).is_file() else None


def _digest(*parts: Any) -> str:
    def plain(x: Any) -> Any:
        return x.model_dump(mode="json") if isinstance(x, BaseModel) else str(x)

    return hashlib.sha256(json.dumps([plain(p) for p in parts]).encode()).hexdigest()


def _prepare_key(_ctx: Any, p: dict[str, Any]) -> str:
    cfg: DataConfig = p["cfg"]
    return _digest(cfg, *(_file_sha256(f) for f in (cfg.csv, cfg.train_csv, cfg.test_csv)))


def _poison_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _digest(p["cfg"], p["clean"], report.dataset_version(p["clean"]))


def _train_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _digest(p["cfg"], p["shards"], report.dataset_version(p["shards"]), p["run_dir"])


def _evaluate_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _digest(p["cfg"], _file_sha256(p["checkpoint"]), report.dataset_version(p["clean"]))


def _cached(key_fn: Any) -> dict[str, Any]:
    return {
        "cache_policy": PlainRecordsOnly(
            policy=CacheKeyFnPolicy(cache_key_fn=key_fn) + TASK_SOURCE
        ),
        "persist_result": True,
        # plain JSON, not Prefect's default pickle nor its JSON (which imports the module a
        # value names), and only records written that way are read back: a result file planted
        # in the storage folder is data (a path, a dict of floats), never code (flows/results.py)
        "result_serializer": PlainJSON(),
    }


# --- pipeline stages ---------------------------------------------------------------------------


@task(name="prepare", **IO_RETRIES, **_cached(_prepare_key))
def prepare_task(cfg: DataConfig) -> Path:
    """Ingest ``cfg``'s source into ``cfg.out``; returns that folder."""
    prepare(cfg)
    return Path(cfg.out)


@task(name="poison", **_cached(_poison_key))
def poison_task(cfg: PoisonConfig, clean: Path) -> Path:
    """Protect ``clean``'s train split into ``cfg.out``; returns that folder. With
    ``cfg.nproc`` > 1 through torchrun (:mod:`flows.torchrun`), else in this process."""
    cfg = cfg.model_copy(update={"clean": Path(clean)})
    if cfg.nproc > 1:
        torchrun.launch(cfg.nproc, "poison", "poison", cfg)
    else:
        poison(cfg)
    return Path(cfg.out)


class _TrainerLinesToTaskLog(APILogHandler):
    """The trainer's own lines into the current task run's log in the Prefect API (UI), once.

    open_clip_train logs through the root logger and prints those lines itself (its stderr
    handler), so this handler sends them to the API only, never to a console."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Replaces the handler's filter list on purpose: mme.victim adds one to every root
        # handler present when the trainer starts so that consoles print its lines once; this
        # handler exists for exactly those lines. The model printout is dropped before any
        # handler (mme.victim's filter on the root logger itself).
        return record.name == "root"


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextmanager
def trainer_lines_in_task_log() -> Iterator[None]:
    root, http = logging.getLogger(), logging.getLogger("httpx")
    handler = _TrainerLinesToTaskLog()
    root.addHandler(handler)
    # open_clip_train raises every logger to INFO, httpx's too, which would then print one
    # console line per POST of these very lines to the API
    http.addFilter(_warnings_only)
    try:
        yield
    finally:
        root.removeHandler(handler)
        http.removeFilter(_warnings_only)


@task(name="train", task_run_name="train-{run_dir.name}", **_cached(_train_key))
def train_task(cfg: VictimConfig, shards: Path, run_dir: Path) -> Path:
    """Train a victim on ``shards``; returns its checkpoint. With ``cfg.nproc`` > 1 through
    torchrun (:mod:`flows.torchrun`, its output streamed into the task log), else in this
    process (the trainer's lines: task log)."""
    if cfg.nproc > 1:
        extra = ["--shards", str(shards), "--run-dir", str(run_dir)]
        torchrun.launch(cfg.nproc, "train", "victim", cfg, extra)
        return Path(run_dir) / "checkpoint.pt"  # where train_victim puts it
    with trainer_lines_in_task_log():
        return train_victim(cfg, Path(shards), Path(run_dir))


@task(name="evaluate", task_run_name="evaluate-{checkpoint.parent.name}", **_cached(_evaluate_key))
def evaluate_task(cfg: EvaluateConfig, checkpoint: Path, clean: Path) -> dict[str, float]:
    """Retrieval metrics of ``checkpoint`` on ``clean``'s test split (logged to MLflow)."""
    checkpoint = Path(checkpoint)
    return evaluate_and_log(cfg, checkpoint, Path(clean), out=checkpoint.parent / "metrics.json")


# The reevaluate flow decides from MLflow what to run: no result cache on top of it (a cached
# run would log nothing, and the victim would stay "missing" forever).
train_uncached = train_task.with_options(cache_policy=NO_CACHE, persist_result=False)
evaluate_uncached = evaluate_task.with_options(cache_policy=NO_CACHE, persist_result=False)


@task(name="report", **IO_RETRIES)
def report_task(experiment: str | None, datasets: list[Path]) -> str:
    """The Markdown comparison table of the runs trained on ``datasets`` (printed too)."""
    table = report.markdown_table(report.mlflow_rows(experiment, [Path(d) for d in datasets]))
    print(table or "(no evaluated victims)")
    return table


def run_params(poison_cfg: PoisonConfig, victim: VictimConfig) -> dict[str, Any]:
    """The pipeline's parent-run params, with the names every stage uses."""
    return {
        "method": poison_cfg.method,
        "epsilon": poison_cfg.epsilon,
        "trigger_len": poison_cfg.trigger_len if poison_cfg.method == "mem" else 0,
        "victim_model": victim.model,
        "epochs": victim.epochs,
        "batch_size": victim.batch_size,
        "lr": victim.lr,
    }


# --- reevaluate --------------------------------------------------------------------------------


class Plan(BaseModel):
    """What a ``reevaluate`` run works on, read from params.yaml when it starts."""

    cfg: ReevaluateConfig
    victims: list[VictimConfig]
    evaluate: EvaluateConfig
    experiment: str


@task(name="load-plan")
def plan_task(
    params: Path,
    protected: Path | None,
    clean: Path | None,
    rev: str | None,
    victims: list[VictimConfig] | None,
) -> Plan:
    """``reevaluate``/``evaluate``/``tracking`` sections of ``params`` (+ the flow's overrides).

    Without ``protected`` (and ``rev``) the data follow whichever pipeline made them: of the DVC
    pipeline's protected set (``reevaluate.protected``) and the served Prefect pipeline's
    (``runs/prefect/protected/<method>``), the one written last. Without ``clean``:
    ``reevaluate.clean`` for ``reevaluate.protected``, else the clean set the protected set was
    made from (its manifest's ``clean``).
    """
    cfg = load_section("reevaluate", params, {"protected": protected, "rev": rev})
    dvc_protected = cfg.protected
    if protected is None and rev is None:
        cfg = cfg.model_copy(update={"protected": _latest_protected(params, dvc_protected)})
    if clean is None and rev is None and Path(cfg.protected) != Path(dvc_protected):
        clean = _clean_of(
            cfg.protected, params
        )  # not the params.yaml pair: the one it was made from
    if clean is not None:
        cfg = cfg.model_copy(update={"clean": Path(clean)})
    return Plan(
        cfg=cfg,
        victims=victims if victims is not None else reevaluation_victims(params),
        evaluate=load_section("evaluate", params),
        experiment=load_section("tracking", params).experiment,
    )


def _latest_protected(params: Path, dvc_default: Path) -> Path:
    candidates = [Path(dvc_default)]
    try:
        candidates.append(prefect_outputs(params)[1].out)
    except ConfigError:  # data/poison sections unusable here: only the DVC default
        pass
    made = [p for p in candidates if (p / "manifest.json").is_file()]
    if not made:
        return Path(dvc_default)  # check_task says where it looked
    chosen = max(made, key=lambda p: (p / "manifest.json").stat().st_mtime)
    print(f"reevaluate: protected set {chosen} (the newest of {', '.join(map(str, made))})")
    return chosen


def _clean_of(protected: Path, params: Path) -> Path | None:
    """The clean folder a protected set was made from: of the DVC and the Prefect pipeline's
    clean sets, the one whose version the set records (``clean_manifest_sha256``: the public
    manifest names no local path); sets made before that named the folder (``clean``)."""
    try:
        manifest = shards.load_manifest(protected)
    except (FileNotFoundError, ValueError):
        return None
    version = manifest.get("clean_manifest_sha256")
    if version is None:
        recorded = manifest.get("clean")
        return Path(recorded) if isinstance(recorded, str) and recorded else None
    candidates = [load_section("data", params).out]
    try:
        candidates.append(prefect_outputs(params)[0].out)
    except ConfigError:
        pass
    return next((c for c in candidates if shards.manifest_sha256(c) == version), None)


@task(name="check-inputs")
def check_task(dataset: Path, plan: Plan) -> None:
    """Fail before any training, naming every missing or bad input at once."""
    problems = []
    if shards.manifest_sha256(dataset) is None:
        problems.append(
            f"protected set {dataset}: no manifest.json (run the pipeline first: `make run`,"
            " `dvc repro` or mme-pipeline/default; or pass --param protected=DIR)"
        )
    clean = Path(plan.cfg.clean)
    try:
        n_test = shards.load_manifest(clean).get("splits", {}).get("test", {}).get("images", 0)
    except FileNotFoundError:
        problems.append(f"clean set {clean}: no manifest.json (--param clean=DIR)")
    else:
        if not n_test or not shards.shard_paths(clean, "test"):
            problems.append(
                f"clean set {clean}: no test split (test-*.tar) to evaluate on; prepare it with"
                " a test split (e.g. --n-test, --test-fraction) or --param clean=DIR"
            )
    for i, victim in enumerate(plan.victims):
        try:
            models.check_model_name(victim.model)
        except ValueError as err:
            problems.append(f"victims[{i}].model = {victim.model!r}: {err}")
    if problems:
        raise ValueError("reevaluate cannot start:\n- " + "\n- ".join(problems))


@task(name="fetch-dataset", **IO_RETRIES)
def fetch_task(protected: Path, rev: str | None, runs: Path) -> Path:
    """``protected`` itself, or (``rev`` given) its copy at that git/DVC revision (``dvc get``)."""
    if rev is None:
        return Path(protected)
    dest = Path(runs) / "datasets" / re.sub(r"[^A-Za-z0-9._-]", "_", rev)
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dvc", "get", ".", str(protected), "--rev", rev]
    subprocess.run([*cmd, "-o", str(dest), "--force"], check=True)
    return dest


@task(name="dataset-version")
def version_task(dataset: Path) -> str:
    """The dataset version: the content of its shards (:func:`mme.shards.manifest_sha256`)."""
    version = report.dataset_version(dataset)
    if version is None:
        raise FileNotFoundError(
            f"{dataset}/manifest.json not found: not an mme dataset (create it with `make run` or "
            "`dvc repro`, or point reevaluate.protected / --param protected=... at one)"
        )
    return version


@task(name="pending-victims", **IO_RETRIES)
def pending_task(
    version: str, victims: list[VictimConfig], experiment: str, runs: Path
) -> list[tuple[VictimConfig, Path]]:
    """Victims with no result for ``version`` in MLflow, each with its run folder."""
    todo = report.pending_victims(version, victims, experiment)
    print(
        f"{len(victims) - len(todo)} of {len(victims)} victims already evaluated on {version[:8]}"
    )
    return [(v, Path(runs) / version[:12] / victim_slug(v)) for v in todo]


def victim_slug(victim: VictimConfig) -> str:
    """A folder name for a victim: its model and a short hash of its identity."""
    ident = report.victim_identity(victim)
    return f"{victim.model}-{_digest(*sorted(ident.items()))[:8]}"


def reevaluate_params(version: str, plan: Plan, n_new: int) -> dict[str, Any]:
    """The reevaluate parent-run params."""
    return {"data_manifest_sha256": version, "n_victims": len(plan.victims), "n_new": n_new}
