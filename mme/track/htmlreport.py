"""``mme report --html FILE``: one self-contained page for people who do not read Markdown.

The page holds the comparison table, the recall@K curves, each victim's training-loss curve and
the poison grid (clean | amplified noise | protected, with the triggered captions, as ``mme
poison`` draws it in ``grid.png``). Pictures are embedded as ``data:`` URIs and the style is
inline, so the file opens anywhere, offline, and can be mailed or attached as it is. Pictures
need matplotlib (the ``ops`` extra); without it the page says so in their place.
"""

from __future__ import annotations

import base64
import csv
import html
import tempfile
from pathlib import Path

from mme.track import plots

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
  color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; } td.num { text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; border: 1px solid #ddd; }
p.note { color: #666; }
"""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _img(png: Path | None, alt: str) -> str:
    if png is None or not Path(png).is_file():
        return f'<p class="note">{html.escape(alt)}: no picture (matplotlib missing or no data)</p>'
    return f'<img alt="{html.escape(alt)}" src="{_data_uri(png)}">'


def table_html(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells that look numeric are right-aligned. Everything is escaped."""

    def cell(text: str, tag: str) -> str:
        num = tag == "td" and text.replace(".", "", 1).replace("-", "", 1).isdigit()
        cls = ' class="num"' if num else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a Markdown table as :func:`mme.track.report.markdown_table` writes it."""
    lines = [ln.strip().strip("|").split("|") for ln in markdown.strip().splitlines()]
    cells = [[c.strip() for c in ln] for ln in lines]
    return cells[0], cells[2:]


def _loss_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


def write_html(
    out: Path,
    table_markdown: str,
    curves: dict[str, dict[str, float]],
    loss_csvs: dict[str, Path],
    grid_png: Path | None,
    title: str = "mme report",
) -> Path:
    """Write the page to ``out`` (atomically) and return it."""
    from mme import fsio

    header, rows = markdown_to_rows(table_markdown)
    parts: list[str] = [f"<h1>{html.escape(title)}</h1>", "<h2>Comparison</h2>"]
    parts.append(table_html(header, rows))
    with tempfile.TemporaryDirectory() as tmp:
        recall = plots.recall_chart(curves, Path(tmp) / "recall.png") if curves else None
        parts += ["<h2>Recall@K on the clean test split</h2>", _img(recall, "recall curves")]
        parts.append("<h2>Victim training loss</h2>")
        for label, path in loss_csvs.items():
            png = plots.loss_curve(_loss_rows(path), Path(tmp) / f"loss-{len(parts)}.png", label)
            parts.append(_img(png, f"training loss of {label}"))
        if not loss_csvs:
            parts.append('<p class="note">no train_loss.csv found</p>')
        parts.append("<h2>Clean | amplified noise | protected</h2>")
        parts.append(_img(grid_png, "poison grid"))
        page = (
            "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n"
        )
    fsio.write_text(out, page)
    return Path(out)


def find_loss_csvs(labels: list[str], runs_dir: Path) -> dict[str, Path]:
    """``runs_dir/<label>/train_loss.csv`` for every label that has one."""
    found = {lab: Path(runs_dir) / lab / "train_loss.csv" for lab in labels}
    return {k: v for k, v in found.items() if v.is_file()}
