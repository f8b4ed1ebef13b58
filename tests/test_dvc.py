"""The DVC pipeline end to end on the tiny profile, through ``make run-tiny`` into a temporary
copy of the repo: ``dvc repro``, ``dvc plots show``, ``mme report --html``,
``dvc push`` to a local remote, ``dvc exp run -S``, ``dvc exp show``, ``dvc metrics diff``, the
MLflow parent runs, and ``dvc get`` of the protected set at a revision (``reevaluate --rev``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VENV = BIN.parent
# `make run-tiny` (params.tiny.yaml) with one attacked victim: attack -> train -> evaluate
TEST_PARAMS = {"attacks": {"jpeg90": "jpeg:90"}}
EXPERIMENT = yaml.safe_load((REPO / "params.tiny.yaml").read_text())["tracking"]["experiment"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git"),
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
    pytest.mark.skipif(not (BIN / "dvc").exists(), reason="needs dvc in the venv"),
]


def run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def sh(repo: Path, *cmd: str) -> str:
    return run(repo, *cmd).stdout


def dvc(repo: Path, *args: str) -> str:
    return sh(repo, str(BIN / "dvc"), *args)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's `make run-tiny` into a temporary folder: a copy of this checkout with the
    tiny profile (+ one attack), its own git and DVC repo, reproduced once and committed."""
    root = tmp_path_factory.mktemp("dvc")
    repo = root / "repo"
    params = yaml.safe_load((REPO / "params.tiny.yaml").read_text()) | TEST_PARAMS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MME_TRACKING", "on")
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MME_PARENT_RUN", "test-repro")
        mp.delenv("DVC_EXP_NAME", raising=False)
        make = ["make", "-s", "-o", "venv", "run-tiny", f"VENV={VENV}", f"TINY={repo}"]
        sh(REPO, *make, f"TINY_PARAMS={root / 'params.yaml'}")
        assert sh(repo, "git", "status", "--porcelain") == ""  # run-tiny committed its run
        mp.delenv("MME_PARENT_RUN")
        yield repo


def _mlflow_runs() -> list[dict]:
    from mme.track import tracking

    return tracking.search_runs("", EXPERIMENT)


def test_repro_outputs_and_metrics(repo: Path) -> None:
    for name in ("clean", "protected"):
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert metrics["n_images"] == 32
        assert (repo / "reports" / "recall" / f"{name}.csv").exists()
    assert "| clean |" in (repo / "reports" / "table.md").read_text()
    attacked = json.loads((repo / "data" / "attacked" / "jpeg90" / "manifest.json").read_text())
    assert attacked["attack"] == "jpeg:90" and attacked["method"] == "keyed"  # the default method
    assert json.loads((repo / "metrics" / "attacked-jpeg90.json").read_text())["n_images"] == 32
    assert "| attacked-jpeg90 |" in (repo / "reports" / "table.md").read_text()
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    assert "metrics/protected.json" in dvc(repo, "metrics", "show")


def test_plots_render_loss_recall_and_grid(repo: Path, tmp_path: Path) -> None:
    """Issue 22: a plot on a path no stage writes (data/protected/mem/grid.png) failed it."""
    done = run(repo, str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots"))
    assert "failed to load" not in done.stdout + done.stderr, done.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    for name in ("train_loss", "recall.png", "grid.png"):
        assert name in html, name


def test_html_report_by_default_on_the_pipeline_outputs(repo: Path) -> None:
    """`mme report --html` (MLflow rows) finds every victim's loss curve and the protected
    samples where `make run` leaves them, and embeds no private pixel."""
    import base64

    sh(repo, str(BIN / "mme"), "report", "--html", "report.html")
    page = (repo / "report.html").read_text()
    assert page.count("training loss of") == 2  # report.datasets: the clean and MEM victims
    assert "no train_loss.csv" not in page and "no protected samples" not in page
    grid = (repo / "data" / "private" / "mem" / "grid.png").read_bytes()
    assert base64.b64encode(grid).decode() not in page


def test_push_to_local_remote(repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "--local", "-d", "test", str(remote))
    dvc(repo, "push")
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["poison"]["outs"]}
    protected = outs["data/protected/mem"]
    assert protected["path"] == "data/protected/mem" and protected["nfiles"] >= 3
    assert len(pushed) >= protected["nfiles"]


def test_publish_public_side_alone(repo: Path, tmp_path: Path) -> None:
    """`dvc push -r public <poison.out>` (docs/threat-model.md) uploads the protected shards and
    manifest, and nothing of the private folder or the clean shards."""
    public = tmp_path / "public"
    dvc(repo, "remote", "add", "--local", "public", str(public))
    dvc(repo, "push", "-r", "public", "data/protected/mem")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["poison"]["outs"]}
    assert set(outs) == {"data/protected/mem", "data/private/mem"}
    pushed = {p.parent.name + p.name for p in public.rglob("*") if p.is_file()}
    assert outs["data/protected/mem"]["md5"] in pushed  # the folder listing (.dir)
    assert outs["data/private/mem"]["md5"] not in pushed
    assert lock["stages"]["prepare"]["outs"][0]["md5"] not in pushed
    never = [repo / "data/private/mem" / n for n in ("noise.npy", "triggers.json", "grid.png")]
    never += list((repo / "data/shards/synthetic").glob("*.tar"))
    for path in never:
        assert hashlib.md5(path.read_bytes()).hexdigest() not in pushed, path.name
    published = [repo / "data/protected/mem" / n for n in ("manifest.json", "train-000000.tar")]
    for path in published:
        assert hashlib.md5(path.read_bytes()).hexdigest() in pushed, path.name


def test_mlflow_parent_run_per_pipeline_run(repo: Path) -> None:
    runs = _mlflow_runs()
    (parent,) = [r for r in runs if r["run_name"] == "test-repro"]
    children = {
        r["run_name"] for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]
    }
    assert children == {
        "poison-keyed",  # the stage run is named after the method
        "train-clean",
        "train-protected",
        "evaluate-clean",
        "evaluate-protected",
        "train-attacked-jpeg90",
        "evaluate-attacked-jpeg90",
    }
    # the DVC report stage's table, on the parent run
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert [a.path for a in client.list_artifacts(parent["run_id"])] == ["report.md"]


def test_exp_run_show_and_metrics_diff(repo: Path) -> None:
    out = dvc(repo, "exp", "run", "-S", "poison.epsilon=4", "-n", "eps4")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # Only what depends on poison runs again; `report` too when the protected metrics moved
    # (victims are seeded, so on 8 test images an ε change may leave every rank as it was).
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD", "--json"))
    moved = {"report"} if diff else set()
    attacked = {f"{s}@jpeg90" for s in ("attack", "train_attacked", "evaluate_attacked")}
    assert ran == {"poison", "train_protected", "evaluate_protected"} | attacked | moved
    assert "metrics/clean.json" not in diff
    full = json.loads(dvc(repo, "metrics", "diff", "HEAD", "--all", "--json"))
    assert {"metrics/protected.json", "metrics/clean.json"} <= set(full)
    before = yaml.safe_load(sh(repo, "git", "show", "HEAD:dvc.lock"))["stages"]
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, changed in (("train_protected", True), ("train_clean", False)):
        md5 = [{o["path"]: o["md5"] for o in lock[stage]["outs"]} for lock in (before, after)]
        assert (md5[0] != md5[1]) == changed, stage
    exps = json.loads(dvc(repo, "exp", "show", "--json"))
    names = {e.get("name") for base in exps for e in (base.get("experiments") or [])}
    assert "eps4" in names
    # `make exp`: one readable table, the params that vary and rsum/chance per victim
    table = sh(repo, "make", "-s", "exp", f"BIN={BIN}").splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[0] == "Experiment"
    assert set(header[1:]) == {  # one rsum/chance column per victim (the attacked one too)
        "metrics/clean.json:rsum_over_chance",
        "metrics/protected.json:rsum_over_chance",
        "metrics/attacked-jpeg90.json:rsum_over_chance",
        "poison.epsilon",
    }
    assert len(header) == 5
    assert any("eps4" in row for row in table[2:])
    # The experiment's stages nest under a parent run named after it.
    runs = _mlflow_runs()
    (parent,) = [r for r in runs if r["run_name"] == "eps4"]
    assert any(r["tags"].get("mlflow.parentRunId") == parent["run_id"] for r in runs)


def test_fetch_protected_set_at_revision(repo: Path, tmp_path: Path, monkeypatch) -> None:
    # `reevaluate --rev`: the protected set as committed (epsilon 8), whatever the workspace
    # holds (after the experiment above: epsilon 4).
    from flows.tasks import fetch_task

    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    got = fetch_task.fn(Path("data/protected/mem"), "HEAD", tmp_path)
    assert got.is_relative_to(tmp_path)
    assert json.loads((got / "manifest.json").read_text())["config"]["epsilon"] == 8.0
