"""``mme report --html FILE``: one self-contained page for people who do not read Markdown.

The page holds the comparison table, the recall@K curves, each victim's training-loss curve and
pictures of the protected set. Pictures are embedded as ``data:`` URIs and the style is inline,
so the file opens anywhere, offline, and can be mailed or attached as it is. Curves need
matplotlib (the ``ops`` extra); without it the page says so in their place.

Private pixels stay out by default: the page shows a few **protected** samples with their
captions, the bytes as they are published. The poison grid (``grid.png``: clean | amplified
noise | protected) shows clean photos and the noise, which give the clean images back; it is
embedded only when asked (``--include-private``), and the page then says so at the top.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mme import fsio, limits, shards
from mme.track import plots

N_SAMPLES = 6  # protected samples shown
MIME = {"png": "image/png", "jpg": "image/jpeg"}
PRIVATE_BANNER = (
    "This page embeds PRIVATE pixels: the poison grid shows the clean photos and the noise, "
    "which give the clean images back. Keep it with the private files; never publish it."
)
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
  color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; } td.num { text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; border: 1px solid #ddd; }
img.sample { width: 128px; image-rendering: pixelated; }
p.note { color: #666; }
p.private { background: #fde8e8; border: 2px solid #c00; padding: .6em; font-weight: bold; }
"""


@dataclass
class Page:
    """What the page shows. ``grid`` (private) is embedded only when set; ``samples`` is the
    protected set's folder (public) whose first :data:`N_SAMPLES` images are shown."""

    header: list[str]
    cells: list[list[str]]
    curves: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_csvs: dict[str, Path] = field(default_factory=dict)
    samples: Path | None = None
    grid: Path | None = None
    title: str = "mme report"


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _img(png: Path | None, alt: str) -> str:
    if png is None or not Path(png).is_file():
        return f'<p class="note">{html.escape(alt)}: no picture (matplotlib missing or no data)</p>'
    data = fsio.read_regular(png, limits.MAX_FILE_BYTES)
    return f'<img alt="{html.escape(alt)}" src="{_data_uri(data)}">'


def table_html(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells that look numeric are right-aligned. Everything is escaped."""

    def cell(text: str, tag: str) -> str:
        num = tag == "td" and text.replace(".", "", 1).replace("-", "", 1).isdigit()
        cls = ' class="num"' if num else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def read_loss_csv(path: Path) -> list[dict[str, float]]:
    """``train_loss.csv`` rows as floats (a plain file under the size cap; bad cells dropped)."""
    text = fsio.read_regular(path, limits.MAX_FILE_BYTES).decode("utf-8", "replace")
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        values = {}
        for key, value in row.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError):
                continue
        if {"step", "loss"} <= values.keys():
            out.append(values)
    return out


def samples_html(folder: Path, n: int = N_SAMPLES) -> str:
    """The first ``n`` samples of a protected folder: image (its published bytes) + captions."""
    try:
        first = list(itertools.islice(shards.iter_samples(folder, "train"), n))
    except (OSError, shards.BadShard) as err:
        return f'<p class="note">no protected samples ({html.escape(str(err))})</p>'
    rows = []
    for s in first:
        uri = _data_uri(s.image_bytes, MIME.get(s.image_ext, "application/octet-stream"))
        caps = "<br>".join(html.escape(c) for c in s.captions)
        img = f'<img class="sample" alt="{html.escape(s.id)}" src="{uri}">'
        rows.append(f"<tr><td>{img}</td><td>{caps}</td></tr>")
    note = (
        f'<p class="note">The first {len(first)} images of {html.escape(Path(folder).name)} with '
        "their captions (trigger words included), as published. The clean | noise | protected "
        "grid is private: <code>mme report --html FILE --include-private</code> adds it.</p>"
    )
    return note + "<table><tbody>" + "".join(rows) + "</tbody></table>"


def _pictures(page: Page, tmp: Path) -> list[str]:
    recall = plots.recall_chart(page.curves, tmp / "recall.png") if page.curves else None
    parts = ["<h2>Recall@K on the clean test split</h2>", _img(recall, "recall curves")]
    parts.append("<h2>Victim training loss</h2>")
    for i, (label, path) in enumerate(page.loss_csvs.items()):
        png = plots.loss_curve(read_loss_csv(path), tmp / f"loss-{i}.png", label)
        parts.append(_img(png, f"training loss of {label}"))
    if not page.loss_csvs:
        parts.append('<p class="note">no train_loss.csv found</p>')
    parts.append("<h2>The protected set</h2>")
    if page.samples is not None:
        parts.append(samples_html(page.samples))
    else:
        parts.append('<p class="note">no protected set among the report datasets</p>')
    if page.grid is not None:
        parts += ["<h2>Clean | amplified noise | protected (private)</h2>", _img(page.grid, "grid")]
    return parts


def write_html(out: Path, page: Page) -> Path:
    """Write the page to ``out`` (atomically) and return it."""
    parts: list[str] = [f"<h1>{html.escape(page.title)}</h1>"]
    if page.grid is not None:
        parts.append(f'<p class="private">{html.escape(PRIVATE_BANNER)}</p>')
    parts += ["<h2>Comparison</h2>", table_html(page.header, page.cells)]
    with tempfile.TemporaryDirectory() as tmp:
        parts += _pictures(page, Path(tmp))
    doc = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(page.title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    fsio.write_text(out, doc)
    return Path(out)
