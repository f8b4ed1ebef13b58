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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mme import fsio, guard, paths, shards
from mme.config import (
    ConfigError,
    ReportConfig,
    VictimConfig,
    add_params_argument,
    load_section,
)
from mme.manifest import read_manifest
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
    run_dir: Path | None = None  # the victim's run folder (its checkpoint's), when known


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
    checkpoint = p.get("checkpoint")
    run_dir = Path(checkpoint).parent if checkpoint else None
    return Row(labels, dict(run["metrics"]), run_dir)


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


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table, as plain text (label columns, then the metrics)."""
    label_cols = list(rows[0].labels) if rows else []
    header = [*label_cols, *(c[0] for c in METRIC_COLUMNS)]
    cells = []
    for row in rows:
        line = [str(row.labels.get(c, "")) for c in label_cols]
        for _, key, fmt in METRIC_COLUMNS:
            value = row.metrics.get(key)
            line.append("—" if value is None else format(value, fmt))
        cells.append(line)
    return header, cells


def markdown_cell(text: str) -> str:
    """A cell that cannot break the table: ``|`` escaped, line breaks as spaces (labels come
    from MLflow params and file names, i.e. from anyone)."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (empty string for no rows)."""
    if not rows:
        return ""
    header, cells = table_cells(rows)
    n_labels = len(header) - len(METRIC_COLUMNS)
    lines = ["| " + " | ".join(map(markdown_cell, header)) + " |"]
    lines.append("|" + "---|" * n_labels + "---:|" * len(METRIC_COLUMNS))
    lines += ["| " + " | ".join(map(markdown_cell, line)) + " |" for line in cells]
    return "\n".join(lines)


def recall_curve(row: Row) -> list[dict[str, float]]:
    """``[{k, i2t, t2i}, ...]`` for K in 1, 5, 10."""
    m = row.metrics
    return [{"k": k, "i2t": m[f"i2t_r{k}"], "t2i": m[f"t2i_r{k}"]} for k in KS]


def row_label(row: Row) -> str:
    """A row's labels joined by ``-`` (legends; :func:`file_label` for file names)."""
    return "-".join(str(v) for v in row.labels.values())


def file_label(row: Row) -> str:
    """:func:`row_label` as one file-name component: path separators and control characters
    become ``_``, no leading dot, at most 200 characters (labels come from MLflow params: a
    ``/`` there must not write outside the folder)."""
    name = re.sub(r"[/\\\x00-\x1f\x7f]", "_", row_label(row)).lstrip(".")[:200]
    return name or "_"


def write_recall_csvs(rows: list[Row], folder: Path) -> list[Path]:
    """One ``<label>.csv`` recall curve per row (labels joined by ``-``) under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows:
        path = folder / (file_label(row) + ".csv")
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
        help="also write one self-contained page: table, recall and loss curves, protected "
        "samples (public pixels only, unless --include-private)",
    )
    parser.add_argument(
        "--include-private",
        action="store_true",
        help="--html: also embed the poison grid (clean | noise | protected: PRIVATE pixels); "
        "the page then says so",
    )
    parser.add_argument(
        "--grid",
        type=Path,
        default=None,
        help=f"--include-private: this grid.png (default: {paths.PRIVATE / 'grid.png'})",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=paths.RUNS,
        help="--html: loss curves of runs without a known run folder from "
        "RUNS_DIR/<label>/train_loss.csv (default: runs)",
    )


def run(args: argparse.Namespace) -> int:
    if args.grid is not None and not args.include_private:
        raise ConfigError("--grid shows clean photos and noise (private): add --include-private")
    overrides = {"experiment": args.experiment, "datasets": args.dataset, "out": args.out}
    cfg: ReportConfig = load_section("report", args.params, overrides)
    with guard.claim("mme report", *_outputs(args, cfg.out)):
        return _report(args, cfg)


def _outputs(args: argparse.Namespace, out: Path | None) -> tuple[list, dict[str, Path | None]]:
    """What ``mme report`` writes and reads, for :mod:`mme.guard`: the table and the page
    replace only a table and a page, the recall folder only an earlier one."""
    outputs = [
        guard.File(out, guard.text_starting_with("| "), "--out") if out else None,
        guard.File(args.html, guard.text_starting_with("<!doctype html"), "--html")
        if args.html
        else None,
        guard.Folder(args.recall_dir, "recall", "--recall-dir") if args.recall_dir else None,
    ]
    inputs = {f"--metrics {p}": p for p in args.metrics or []}
    return outputs, {**inputs, "--grid": args.grid}


def _report(args: argparse.Namespace, cfg: ReportConfig) -> int:
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
        write_page(args, cfg, rows)
    return 0


def loss_csv(row: Row, runs_dir: Path) -> Path | None:
    """The victim's ``train_loss.csv``: in its run folder (an MLflow row's checkpoint folder),
    else in ``runs_dir/<label>/`` (``metrics/clean.json`` is labelled ``clean``: ``runs/clean``)."""
    folders = [row.run_dir] if row.run_dir is not None else []
    folders.append(Path(runs_dir) / file_label(row))
    return next((f / "train_loss.csv" for f in folders if (f / "train_loss.csv").is_file()), None)


def protected_folder(datasets: list[Path]) -> Path | None:
    """The first of ``datasets`` whose manifest says it is protected (public: as published)."""
    for folder in datasets:
        try:
            if read_manifest(Path(folder)).protected:
                return Path(folder)
        except (FileNotFoundError, ConfigError):
            continue
    return None


def write_page(args: argparse.Namespace, cfg: ReportConfig, rows: list[Row]) -> None:
    """``--html``: the page of :mod:`mme.track.htmlreport`; the private grid only if asked."""
    from mme.track import htmlreport

    header, cells = table_cells(rows)
    losses = {row_label(r): loss_csv(r, args.runs_dir) for r in rows}
    page = htmlreport.Page(
        header,
        cells,
        curves={row_label(r): r.metrics for r in rows},
        loss_csvs={label: path for label, path in losses.items() if path is not None},
        samples=protected_folder(cfg.datasets),
        grid=(args.grid or paths.PRIVATE / "grid.png") if args.include_private else None,
    )
    htmlreport.write_html(args.html, page)
    print(f"mme report: wrote {args.html}", file=sys.stderr)
