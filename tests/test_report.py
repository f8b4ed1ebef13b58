"""``mme report`` (table from MLflow runs or metrics files, recall curves), the victim identity
``reevaluate`` uses, and the tracking helpers they rely on (search, cross-process parents)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mme import cli
from mme.config import VictimConfig
from mme.track import report, tracking

METRICS = {
    **{f"{d}_r{k}": 10.0 * k for d in ("i2t", "t2i") for k in (1, 5, 10)},
    "rsum": 320.0,
    "rsum_over_chance": 4.0,
}


def _run(stage="evaluate", start=0, **params) -> dict:
    base = {"eval_shards": "data/shards/synthetic", "data_manifest_sha256": "a" * 64}
    base |= {"victim_model": "mme-tiny-vit", "epochs": "6", "batch_size": "128", "lr": "0.001"}
    return {
        "run_id": f"r{start}",
        "start_time": start,
        "params": base | params,
        "metrics": dict(METRICS),
        "tags": {"stage": stage},
    }


def test_rows_keep_newest_per_dataset_version_and_victim() -> None:
    runs = [
        _run(start=3, method="mem", epsilon="8.0", data_manifest_sha256="b" * 64),
        _run(start=2, method="clean", rsum_marker="newest"),
        _run(start=1, method="clean"),  # older duplicate: dropped
        _run(stage="train", start=0, method="clean"),  # not an evaluation
    ]
    rows = report.rows_from_runs(runs)
    assert [(r.labels["method"], r.labels["data"]) for r in rows] == [
        ("clean", "aaaaaaaa"),
        ("mem", "bbbbbbbb"),
    ]
    assert rows[0].labels["ε"] == "—" and rows[1].labels["ε"] == "8.0"
    assert rows[0].labels["dataset"] == "synthetic"
    assert report.rows_from_runs(runs, versions={"b" * 64})[0].labels["method"] == "mem"


def test_attack_column_orders_attacked_after_their_method() -> None:
    runs = [
        _run(start=3, method="mem", attack="jpeg:90", epsilon="8.0", data_manifest_sha256="c" * 64),
        _run(start=2, method="mem", epsilon="8.0", data_manifest_sha256="b" * 64),
        _run(start=1, method="clean"),
    ]
    rows = report.rows_from_runs(runs)
    assert [(r.labels["method"], r.labels["attack"]) for r in rows] == [
        ("clean", "—"),
        ("mem", "—"),
        ("mem", "jpeg:90"),
    ]
    assert "| mem | jpeg:90 |" in report.markdown_table(rows)


def test_markdown_table() -> None:
    table = report.markdown_table(report.rows_from_runs([_run(method="clean")]))
    header, rule, row = table.splitlines()
    assert header.startswith("| dataset | method | attack | ε | data | victim | epochs | i2t R@1 |")
    assert header.endswith("| rsum | rsum/chance |")
    assert rule.count("---:") == 8
    assert row == (
        "| synthetic | clean | — | — | aaaaaaaa | mme-tiny-vit | 6 | 10.0 | 50.0 | 100.0 "
        "| 10.0 | 50.0 | 100.0 | 320.0 | 4.00 |"
    )
    assert report.markdown_table([]) == ""


def test_victim_identity_matches_logged_params() -> None:
    victim = VictimConfig(model="mme-tiny-vit", epochs=6, batch_size=128, lr=1e-3)
    ident = report.victim_identity(victim)
    assert report.is_evaluated(_run(), "a" * 64, ident)
    assert report.is_evaluated(_run(lr="1e-3"), "a" * 64, ident)  # same number, other spelling
    assert not report.is_evaluated(_run(), "b" * 64, ident)
    assert not report.is_evaluated(_run(epochs="7"), "a" * 64, ident)


def test_metrics_files_table_and_recall_curves(tmp_path: Path, capsys) -> None:
    for name in ("clean", "protected"):
        (tmp_path / f"{name}.json").write_text(json.dumps(METRICS))
    out, curves = tmp_path / "table.md", tmp_path / "recall"
    argv = ["report", "--params", "none", "--out", str(out)]
    argv += ["--metrics", str(tmp_path / "clean.json"), str(tmp_path / "protected.json")]
    assert cli.main([*argv, "--recall-dir", str(curves)]) == 0
    printed = capsys.readouterr().out
    assert "| clean | 10.0 |" in printed and out.read_text().strip() == printed.strip()
    lines = (curves / "protected.csv").read_text().splitlines()
    assert lines == ["k,i2t,t2i", "1,10.0,10.0", "5,50.0,50.0", "10,100.0,100.0"]
    assert (curves / "recall.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One SQLite store for the module (creating one runs MLflow's migrations: seconds); the
    # tests keep apart by experiment name.
    return tmp_path_factory.mktemp("report_store")


@pytest.fixture
def store(store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir / 'mlflow.db'}")
    monkeypatch.setenv("MME_TRACKING", "on")
    monkeypatch.delenv("MME_PARENT_RUN", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _log_evaluation(experiment: str, data_dir: Path, victim: VictimConfig) -> None:
    params = {
        "data_manifest_sha256": report.dataset_version(data_dir),
        "eval_shards": "data/shards/synthetic",
        "method": "mem",
        **report.victim_identity(victim),
    }
    with tracking.start_run(experiment, "evaluate-x", params, {"stage": "evaluate"}):
        tracking.log_metrics(METRICS)


def _manifest(sha: str) -> str:
    """A manifest recording one shard of that (fake) sha256: its content is the version."""
    record = {"name": "train-000000.tar", "count": 1, "sha256": sha * 64}
    return json.dumps({"splits": {"train": {"shards": [record]}}})


def test_mlflow_report_and_pending_victims(store: Path, monkeypatch, capsys) -> None:
    data = store / "protected"
    data.mkdir()
    (data / "manifest.json").write_text(_manifest("1"))
    version = report.dataset_version(data)
    vit, rn = VictimConfig(model="mme-tiny-vit"), VictimConfig(model="mme-tiny-rn")
    _log_evaluation("exp-report", data, vit)
    assert report.pending_victims(version, [vit, rn], "exp-report") == [rn]
    assert report.pending_victims(version, [vit, rn], "other") == [vit, rn]

    argv = ["report", "--params", "none", "--experiment", "exp-report"]
    argv += ["--dataset", str(data)]
    assert cli.main(argv) == 0
    assert "| synthetic | mem |" in capsys.readouterr().out
    (data / "manifest.json").write_text(_manifest("2"))  # new data: nothing evaluated on it
    assert cli.main(argv) == 1
    assert cli.main([*argv, "--all"]) == 0

    monkeypatch.setenv("MME_TRACKING", "off")
    assert report.pending_victims(version, [vit], "exp-report") == [vit]


def test_named_parent_spans_processes(store: Path, monkeypatch) -> None:
    # DVC runs each stage as a process: they find their parent run by name.
    monkeypatch.setenv("MME_PARENT_RUN", "make-run-1")
    with tracking.start_run("exp-parent", "poison", {"method": "mem"}) as a:
        pass
    with tracking.start_run("exp-parent", "train", {}) as b:
        pass
    monkeypatch.delenv("MME_PARENT_RUN")
    monkeypatch.setenv("DVC_EXP_NAME", "eps4")  # `dvc exp run` names it by default
    with tracking.start_run("exp-parent", "train", {}) as c:
        pass
    (first, second) = tracking.search_runs("tags.stage = 'pipeline'", "exp-parent")
    assert {first["run_name"], second["run_name"]} == {"make-run-1", "eps4"}
    parent_of = {
        r["run_id"]: r["tags"]["mlflow.parentRunId"]
        for r in tracking.search_runs("", "exp-parent")
        if "mlflow.parentRunId" in r["tags"]
    }
    assert parent_of[a] == parent_of[b] != parent_of[c]


def test_nested_run_joins_parent_experiment(store: Path) -> None:
    with tracking.start_run("dataset-x", "pipeline", {}):
        with tracking.start_run("mme", "train", {}) as child:
            pass
    assert [r["run_id"] for r in tracking.search_runs("", "dataset-x") if r["run_name"] == "train"]
    assert child not in [r["run_id"] for r in tracking.search_runs("", "mme")]


@pytest.mark.parametrize(
    "path, label",
    [
        ("runs/em/metrics.json", "em"),
        ("metrics/clean.json", "clean"),
        ("metrics.json", ""),
        ("/a/b/protected.json", "protected"),
    ],
)
def test_metrics_label(path, label):
    from mme.track.report import metrics_label

    assert metrics_label(Path(path)) == label


def _html_report(tmp_path: Path) -> Path:
    from mme.protection import grid

    for name in ("clean", "protected"):
        (tmp_path / f"{name}.json").write_text(json.dumps(METRICS))
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        rows = "".join(f"{s},{3 - s / 10},{10 + s}\n" for s in range(5))
        (run / "train_loss.csv").write_text("step,loss,logit_scale\n" + rows)
    clean = np.full((2, 3, 16, 16), 120, np.uint8)
    grid.save_grid(tmp_path / "grid.png", clean, clean + 8, ["a <b>x</b>", "b"], 8.0)
    page = tmp_path / "page" / "report.html"
    argv = ["report", "--params", "none", "--html", str(page), "--grid", str(tmp_path / "grid.png")]
    argv += ["--include-private", "--runs-dir", str(tmp_path / "runs"), "--metrics"]
    argv += [str(tmp_path / "clean.json"), str(tmp_path / "protected.json")]
    assert cli.main(argv) == 0
    return page


def test_html_report_is_one_self_contained_page(tmp_path: Path) -> None:
    page = _html_report(tmp_path).read_text()
    assert page.startswith("<!doctype html>") and "<td>clean</td>" in page
    assert page.count('src="data:image/png;base64,') == 4  # recall, 2 loss curves, grid
    # nothing is fetched: no external URL, script or stylesheet link
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<link" not in page


def test_html_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    """Rendered by a real browser: it must load and lay out the page (DOM dump has the table
    and the four pictures decoded). Skipped where Debian's chromium is not installed."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs chromium (apt-get install chromium)")
    page = _html_report(tmp_path)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr"]
    cmd += ["--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<td>clean</td>" in done.stdout and done.stdout.count("<img") == 4
    for error in ("Failed to load resource", "Uncaught", "net::ERR_"):  # console errors
        assert error not in done.stderr, done.stderr[-2000:]


def _protected_set(folder: Path) -> list[bytes]:
    """A two-image protected folder (shards + a manifest saying ``mem``); its image bytes."""
    from mme import shards
    from mme.manifest import write_manifest

    images = [shards.encode_png(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    samples = [
        shards.Sample(f"p{i}", png, "png", [f"zq a <b>{i}</b>"], {"id": f"p{i}"})
        for i, png in enumerate(images)
    ]
    records = shards.write_shards(folder, "train", samples)
    split = {"images": 2, "captions": 2, "shards": records}
    write_manifest(folder, {"method": "mem", "epsilon": 8, "splits": {"train": split}})
    return images


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """`make run`'s layout in a temporary folder: metrics/, runs/<name>/train_loss.csv, a
    protected set and the private grid at their default paths."""
    from mme import paths
    from mme.protection import grid

    monkeypatch.chdir(tmp_path)
    for name in ("clean", "protected"):
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(METRICS))
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "train_loss.csv").write_text("step,loss\n0,3.0\n1,2.5\n")
    clean = np.full((2, 3, 16, 16), 120, np.uint8)
    grid.save_grid(paths.PRIVATE / "grid.png", clean, clean + 8, ["a", "b"], 8.0)
    images = _protected_set(paths.PROTECTED)
    argv = ["report", "--params", "none", "--dataset", str(paths.PROTECTED), "--html", "r.html"]
    argv += ["--metrics", "metrics/clean.json", "metrics/protected.json"]
    private = (paths.PRIVATE / "grid.png").read_bytes()
    return {"argv": argv, "page": tmp_path / "r.html", "public": images, "private": private}


def test_html_report_by_default_is_complete_without_private_pixels(workspace: dict) -> None:
    """Issue 22 / 20: the default page missed the loss curves and the grid; the grid shows clean
    photos, so the default page shows the protected samples (public) instead."""
    from mme.track import htmlreport

    assert cli.main(workspace["argv"]) == 0
    page = workspace["page"].read_text()
    assert page.count("training loss of") == 2 and "no train_loss.csv" not in page
    assert all(_b64(png) in page for png in workspace["public"])
    assert "zq a &lt;b&gt;1&lt;/b&gt;" in page  # captions escaped
    assert _b64(workspace["private"]) not in page and htmlreport.PRIVATE_BANNER not in page
    assert "--include-private" in page


def test_html_report_with_private_grid_says_so(workspace: dict) -> None:
    from mme.track import htmlreport

    assert cli.main([*workspace["argv"], "--include-private"]) == 0
    page = workspace["page"].read_text()
    assert _b64(workspace["private"]) in page
    assert page.index(htmlreport.PRIVATE_BANNER) < page.index("<h2>Comparison</h2>")


def test_html_report_grid_needs_include_private(workspace: dict, capsys) -> None:
    assert cli.main([*workspace["argv"], "--grid", "data/private/mem/grid.png"]) == 2
    assert "--include-private" in capsys.readouterr().err
    assert not workspace["page"].exists()


def test_mlflow_rows_find_their_loss_curve_in_the_checkpoint_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "somewhere" / "victim"
    run_dir.mkdir(parents=True)
    (run_dir / "train_loss.csv").write_text("step,loss\n0,1\n")
    (row,) = report.rows_from_runs([_run(checkpoint=str(run_dir / "checkpoint.pt"))])
    assert report.loss_csv(row, tmp_path / "runs") == run_dir / "train_loss.csv"
    (other,) = report.rows_from_runs([_run()])
    assert report.loss_csv(other, tmp_path / "runs") is None


@pytest.mark.parametrize("label", ["a|b", "x | y\nz", "back\\slash|"])
def test_markdown_table_escapes_labels(label: str) -> None:
    """A ``|`` in a run label (an MLflow param, a file name) broke the table into more cells."""
    import re

    table = report.markdown_table([report.Row({"run": label}, METRICS)])
    header, _, row = table.splitlines()
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"\|", header))


@pytest.mark.parametrize("label", ["../../etc/x", "a/b", ".hidden", "nul\x00"])
def test_recall_file_names_stay_in_their_folder(tmp_path: Path, label: str) -> None:
    (path,) = report.write_recall_csvs([report.Row({"run": label}, METRICS)], tmp_path / "r")
    assert path.parent == tmp_path / "r" and not path.name.startswith(".")
