"""The documentation works as written (issue 22): every fenced Python block of docs/ marked
``<!-- runnable -->`` (the line right before its opening fence) runs, in a temporary project
folder beside a ``../shared/data`` of a few generated photos; every relative link of README.md
and docs/ names a file that exists and, after ``#``, one of its headings.

Mark a block runnable when it runs in seconds on such tiny data. docs/api.md's example is run
by ``tests/test_api.py::test_docs_example_runs``, which also checks what it writes.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_layout import module_file, top_level_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- runnable -->"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
ANY_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```$", re.S | re.M)  # list items indent theirs
LINK = re.compile(r"\]\(([^)\s]+)\)")


def runnable_blocks(text: str) -> list[str]:
    """The Python blocks whose opening fence follows a :data:`MARK` line; a mark before
    anything else is an error (a mark that silently runs nothing tests nothing)."""
    blocks = []
    for match in re.finditer(re.escape(MARK) + r"\n", text):
        fenced = FENCE.match(text, match.end())
        assert fenced is not None, f"{MARK} must be followed by a ```python block"
        blocks.append(fenced.group(1))
    return blocks


def marked() -> list[tuple[str, int, str]]:
    return [
        (doc.relative_to(ROOT).as_posix(), i, code)
        for doc in DOCS
        for i, code in enumerate(runnable_blocks(doc.read_text()))
    ]


def test_runnable_blocks_are_found() -> None:
    text = f"a\n{MARK}\n```python\nx = 1\n```\n```python\nnot marked\n```\n"
    assert runnable_blocks(text) == ["x = 1\n"]
    with pytest.raises(AssertionError, match="must be followed"):
        runnable_blocks(f"{MARK}\n```bash\nls\n```\n")
    assert {doc for doc, _, _ in marked()} >= {"docs/attacks.md", "docs/native.md"}


def tiny_photos(folder: Path) -> None:
    """Three small noisy JPEGs of different shapes, as ``flickr8k-dev/images`` holds."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 72), (72, 96), (80, 80)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


@pytest.mark.parametrize("doc, index, code", marked(), ids=lambda v: str(v)[:40])
def test_runnable_docs_block(doc: str, index: int, code: str, tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    tiny_photos(tmp_path / "shared" / "data" / "flickr8k-dev" / "images")
    monkeypatch.chdir(project)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MME_TRACKING", "off")
    monkeypatch.setattr(sys, "argv", [f"{doc}[{index}]"])
    exec(compile(code, f"{doc}[{index}]", "exec"), {"__name__": "__docs__"})


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> ``-``."""
    text = re.sub(r"`|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # code, links
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no code comments
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Prefect: deployments, offline", "prefect-deployments-offline"),
        (
            "Reproducible protected sets (`poison.threads`)",
            "reproducible-protected-sets-poisonthreads",
        ),
        ("The researcher's path: a, b", "the-researchers-path-a-b"),
    ],
)
def test_slug(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_relative_links_resolve() -> None:
    """docs/orchestration.md linked ../README.md#orchestration after that section moved."""
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists() or (
                anchor and file.suffix == ".md" and anchor not in anchors(file)
            ):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_docs_python_block_imports_what_exists() -> None:
    """Blocks too slow to run (real photos, a GPU) still must not import a moved module:
    docs/native.md imported ``from mme import native``, docs/attacks.md ``mme.victim.detect``."""
    missing = []
    for doc in DOCS:
        for _, code in ANY_BLOCK.findall(doc.read_text()):
            for node in ast.walk(ast.parse(textwrap.dedent(code))):
                if isinstance(node, ast.Import):
                    wanted = [(a.name, None) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    wanted = [(node.module, a.name) for a in node.names]
                else:
                    continue
                for module, name in wanted:
                    if module.split(".")[0] != "mme":
                        continue
                    file = module_file(module)
                    ok = file is not None and (
                        name is None
                        or module_file(f"{module}.{name}") is not None
                        or name in top_level_names(file)
                        or (module == "mme" and name in _lazy_names())
                    )
                    if not ok:
                        missing.append(f"{doc.relative_to(ROOT)}: {module} {name or ''}")
    assert missing == []


def _lazy_names() -> set[str]:
    import mme

    return set(mme.__all__)
