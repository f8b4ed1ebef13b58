"""``mme report``: the comparison table of evaluated victims, as Markdown.

One row per (dataset, dataset version, victim): the latest finished ``evaluate`` run in MLflow
(read through :mod:`mme.track.tracking`), with image->text and text->image R@1/5/10, ``rsum`` and
``rsum`` over its chance level; ``attack`` names the ``mme attack`` transform of the training
data (``—`` for none). ``dataset`` is the clean test folder's name, the dataset version is
the content of the training data's shards as its ``manifest.json`` records them (the
``data_manifest_sha256`` param every stage logs; the same in any folder), so clean and
protected training sets of one dataset line up in one table.

``--metrics FILE`` builds the table from ``mme evaluate`` metrics files instead (label = file
stem; the DVC ``report`` stage, which must not depend on the MLflow store), and
``--recall-dir DIR`` writes one ``<label>.csv`` recall curve (``k,i2t,t2i``) per row for
``dvc plots``, and ``recall.png`` with every row.

The same identity (dataset version + ``victim_model``, ``epochs``, ``batch_size``, ``lr``) tells
the ``reevaluate`` flow which victims already have a result (:func:`pending_victims`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mme import fsio, paths, shards
from mme.config import ReportConfig, VictimConfig, add_params_argument, load_section
from mme.track import plots, tracking

KS = (1, 5, 10)
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    *((f"i2t R@{k}", f"i2t_r{k}", ".1f") for k in KS),
    *((f"t2i R@{k}", f"t2i_r{k}", ".1f") for k in KS),
    ("rsum", "rsum", ".1f"),
    ("rsum/chance", "rsum_over_chance", ".2f"),
)
# What makes two victims "the same" for the report and for `reevaluate` (shared param names).
VICTIM_KEYS = ("victim_model", "epochs", "batch_size", "lr")
EVALUATE_FILTER = "tags.stage = 'evaluate'"


@dataclass
class Row:
    """One table row: label columns (in order) and the metrics they point at."""

    labels: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)


def dataset_version(folder: Path) -> str | None:
    """The dataset version of ``folder``, or None (:func:`mme.shards.manifest_sha256`)."""
    return shards.manifest_sha256(folder)


def victim_identity(cfg: VictimConfig) -> dict[str, str]:
    """The params a victim's ``evaluate`` run carries, as MLflow stores them (strings)."""
    return {
        "victim_model": cfg.model,
        "epochs": str(cfg.epochs),
        "batch_size": str(cfg.batch_size),
        "lr": str(cfg.lr),
    }


def _same(a: str | None, b: str | None) -> bool:
    # Numbers may come back spelled differently ("0.001" vs "1e-3"); compare them as numbers.
    if a == b:
        return True
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def is_evaluated(run: dict[str, Any], version: str, identity: dict[str, str]) -> bool:
    """True if ``run`` evaluated a victim with ``identity`` trained on data ``version``."""
    params = run["params"]
    if params.get("data_manifest_sha256") != version:
        return False
    return all(_same(params.get(k), v) for k, v in identity.items())


def pending_victims(
    version: str, victims: list[VictimConfig], experiment: str | None = None
) -> list[VictimConfig]:
    """The ``victims`` with no finished ``evaluate`` run on dataset ``version`` in MLflow."""
    filt = f"{EVALUATE_FILTER} and params.data_manifest_sha256 = '{version}'"
    runs = tracking.search_runs(filt, experiment)
    return [
        v for v in victims if not any(is_evaluated(r, version, victim_identity(v)) for r in runs)
    ]


def _run_key(run: dict[str, Any]) -> tuple:
    p = run["params"]
    dataset = Path(p.get("eval_shards", "?")).name
    return (dataset, p.get("data_manifest_sha256"), *(p.get(k) for k in VICTIM_KEYS))


def _run_row(run: dict[str, Any]) -> Row:
    p = run["params"]
    labels = {
        "dataset": Path(p.get("eval_shards", "?")).name,
        "method": p.get("method", "?"),
        "attack": p.get("attack", "—"),  # set for sets made by `mme attack`
        "ε": p.get("epsilon", "—"),
        "data": (p.get("data_manifest_sha256") or "?")[:8],
        "victim": p.get("victim_model", "?"),
        "epochs": p.get("epochs", "?"),
    }
    return Row(labels, dict(run["metrics"]))


def _sort_key(row: Row) -> tuple:
    lab = row.labels
    try:
        eps = float(lab["ε"])
    except ValueError:
        eps = -1.0
    return (
        lab["dataset"],
        lab["victim"],
        lab["epochs"],
        lab["method"] != "clean",
        lab["method"],
        eps,
        lab["attack"] != "—",
        lab["attack"],
    )


def rows_from_runs(runs: list[dict[str, Any]], versions: set[str] | None = None) -> list[Row]:
    """Rows from ``evaluate`` runs (newest first, as :func:`tracking.search_runs` returns them):
    the newest run per (dataset, version, victim); only data ``versions`` when given."""
    seen: set[tuple] = set()
    rows = []
    for run in runs:
        if run["tags"].get("stage") != "evaluate":
            continue
        if versions is not None and run["params"].get("data_manifest_sha256") not in versions:
            continue
        key = _run_key(run)
        if key not in seen:
            seen.add(key)
            rows.append(_run_row(run))
    return sorted(rows, key=_sort_key)


def metrics_label(path: Path) -> str:
    """``runs/em/metrics.json`` -> ``em`` (the run folder); ``metrics/clean.json`` -> ``clean``."""
    path = Path(path)
    return path.parent.name if path.stem == "metrics" else path.stem


def rows_from_metrics(paths: list[Path]) -> list[Row]:
    """Rows from ``mme evaluate`` metrics files, labelled by :func:`metrics_label`, in order."""
    return [Row({"run": metrics_label(p)}, json.loads(Path(p).read_text())) for p in paths]


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (empty string for no rows)."""
    if not rows:
        return ""
    label_cols = list(rows[0].labels)
    header = [*label_cols, *(c[0] for c in METRIC_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(label_cols)]
    lines[1] += "---:|" * len(METRIC_COLUMNS)
    for row in rows:
        cells = [str(row.labels.get(c, "")) for c in label_cols]
        for _, key, fmt in METRIC_COLUMNS:
            value = row.metrics.get(key)
            cells.append("—" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_curve(row: Row) -> list[dict[str, float]]:
    """``[{k, i2t, t2i}, ...]`` for K in 1, 5, 10."""
    m = row.metrics
    return [{"k": k, "i2t": m[f"i2t_r{k}"], "t2i": m[f"t2i_r{k}"]} for k in KS]


def row_label(row: Row) -> str:
    """A row's labels joined by ``-`` (file names, legends)."""
    return "-".join(str(v) for v in row.labels.values())


def write_recall_csvs(rows: list[Row], folder: Path) -> list[Path]:
    """One ``<label>.csv`` recall curve per row (labels joined by ``-``) under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows:
        path = folder / (row_label(row) + ".csv")
        with fsio.atomic_open(path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=["k", "i2t", "t2i"])
            writer.writeheader()
            writer.writerows(recall_curve(row))
        paths.append(path)
    return paths


def mlflow_rows(experiment: str | None, datasets: list[Path]) -> list[Row]:
    """Rows from the MLflow store; only runs trained on the current version of ``datasets``
    (folders with a ``manifest.json``) unless ``datasets`` is empty."""
    versions = None
    if datasets:
        versions = {v for v in map(dataset_version, datasets) if v is not None}
    return rows_from_runs(tracking.search_runs(EVALUATE_FILTER, experiment), versions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser, "report: section")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: all)")
    parser.add_argument(
        "--dataset",
        type=Path,
        action="append",
        default=None,
        help="only runs trained on this folder's current version (repeatable; "
        "default: report.datasets)",
    )
    parser.add_argument("--all", action="store_true", help="every dataset version in the store")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--metrics",
        type=Path,
        nargs="+",
        default=None,
        help="read these metrics JSON files instead of MLflow (label = file stem)",
    )
    parser.add_argument(
        "--recall-dir",
        type=Path,
        default=None,
        help="write <label>.csv recall curves and recall.png (all rows) here",
    )
    parser.add_argument(
        "--html",
        type=Path,
        default=None,
        help="also write one self-contained page: table, recall and loss curves, poison grid",
    )
    parser.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="grid.png for --html (default: the first report dataset folder that has one)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=paths.RUNS,
        help="--html: loss curves from RUNS_DIR/<label>/train_loss.csv (default: runs)",
    )


def run(args: argparse.Namespace) -> int:
    overrides = {"experiment": args.experiment, "datasets": args.dataset, "out": args.out}
    cfg: ReportConfig = load_section("report", args.params, overrides)
    if args.metrics:
        rows = rows_from_metrics(args.metrics)
    else:
        rows = mlflow_rows(cfg.experiment, [] if args.all else cfg.datasets)
    if not rows:
        where = "the metrics files" if args.metrics else tracking.tracking_uri()
        print(f"mme report: no evaluated victims in {where}", file=sys.stderr)
        return 1
    table = markdown_table(rows)
    print(table)
    tracking.log_text_to_parent(table + "\n", "report.md")  # the DVC pipeline's parent run
    if cfg.out is not None:
        fsio.write_text(cfg.out, table + "\n")
    if args.recall_dir is not None:
        write_recall_csvs(rows, args.recall_dir)
        plots.recall_chart(
            {row_label(row): row.metrics for row in rows}, args.recall_dir / "recall.png"
        )
    if args.html is not None:
        write_page(args, cfg, rows, table)
    return 0


def write_page(args: argparse.Namespace, cfg: ReportConfig, rows: list[Row], table: str) -> None:
    """``--html``: the page of :mod:`mme.track.htmlreport`."""
    from mme.track import htmlreport

    labels = [row_label(r) for r in rows]
    grids = [args.grid] if args.grid else [Path(d) / "grid.png" for d in cfg.datasets]
    grid = next((g for g in grids if g.is_file()), None)
    curves = {label: r.metrics for label, r in zip(labels, rows, strict=True)}
    losses = htmlreport.find_loss_csvs(labels, args.runs_dir)
    args.html.parent.mkdir(parents=True, exist_ok=True)
    htmlreport.write_html(args.html, table, curves, losses, grid)
    print(f"mme report: wrote {args.html}", file=sys.stderr)
