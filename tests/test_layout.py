"""Code layout: the stage packages, the import rules between them, one place for default paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "protection", "victim", "track")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b``
    counts as ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph(package: str) -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {name: imported(path) & files.keys() for name, path in files.items()}


def test_stages_are_packages():
    for stage in STAGES:
        assert (ROOT / "mme" / stage / "__init__.py").is_file(), stage


@pytest.mark.parametrize("forbidden", ["flows", "dvc", "prefect"])
def test_mme_never_imports_the_orchestrators(forbidden):
    offenders = [
        module_name(p)
        for p in (ROOT / "mme").rglob("*.py")
        if any(n == forbidden or n.startswith(forbidden + ".") for n in imported(p))
    ]
    assert offenders == []


def test_flows_import_each_other_without_a_cycle():
    """flows.pipeline imported flows.serve (for its __main__) while serve imports pipeline."""
    edges = graph("flows")

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start]
        )

    assert [m for m in edges if reaches(m, m, set())] == []


def test_evaluate_does_not_import_training():
    """Evaluating a checkpoint needs no trainer: evaluate took its default paths from victim."""
    evaluate = imported(ROOT / "mme" / "victim" / "evaluate.py")
    assert not any(n.startswith(("mme.victim.train", "mme.victim.open_clip")) for n in evaluate)


def test_default_paths_are_spelled_out_in_mme_paths_only():
    """``data/...``, ``runs/...`` and ``params.yaml`` as literals live in mme/paths.py alone."""
    offenders = []
    for path in [*(ROOT / "mme").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        if path == ROOT / "mme" / "paths.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "Path"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith(("data", "runs", "params.yaml"))
            ):
                offenders.append(f"{module_name(path)}:{node.lineno}")
    assert offenders == []


def test_dvc_code_dependencies_exist():
    """A moved module must not leave dvc.yaml depending on a path that is gone."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = {
        d
        for stage in stages.values()
        for d in stage.get("do", stage).get("deps", [])
        if d.startswith("mme/")
    }
    assert deps and sorted(d for d in deps if not (ROOT / d).exists()) == []


def top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_every_mme_import_names_a_module_or_name_of_this_checkout():
    """After a move, an import of the old path must fail here, not find an installed copy."""
    missing = []
    for folder in ("mme", "flows", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    wanted = [(a.name, None) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
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
                    )
                    if not ok:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {module} {name}")
    assert missing == []
