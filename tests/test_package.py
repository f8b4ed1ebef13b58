"""The package a user installs (issue 19, item 7): the wheel that `python -m build` makes holds
every module of mme, its model configs and the `mme` console script, and nothing else.

The wheel is built here with the project's own build backend (setuptools' PEP 517 hooks, what
`python -m build` calls) from a copy of the sources, so the checkout is left as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT / "mme", src / "mme", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    code = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "dist" / done.stdout.strip().splitlines()[-1]


def test_wheel_holds_the_package_its_configs_and_the_console_script(tmp_path):
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith("mme-") and wheel.suffix == ".whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(info).decode()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mme").rglob("*.py")}
    assert modules <= names
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mme" / "model_configs").iterdir()}
    assert configs and configs <= names
    assert not {n for n in names if n.startswith(("tests/", "flows/", "scripts/", "data/"))}
    assert "[console_scripts]" in scripts and "mme = mme.cli:main" in scripts
    for dependency in ("torch", "open_clip_torch", "pydantic", "pillow"):
        assert f"Requires-Dist: {dependency}" in meta
