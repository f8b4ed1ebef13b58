"""Code layout: the layers and the import rules between them (core -> stages -> app -> flows,
no cycle), the size limits, one word per concept, one place for default paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "protection", "countermeasures", "victim", "track")

# The layers of mme, bottom up; a module may import its own layer or a lower one only.
# core: typed config, files, shards, models, the process (no stage, no app).
CORE = (
    "mme.config",
    "mme.paths",
    "mme.fsio",
    "mme.guard",  # the one output guard (ownership, ties, overlap, locks)
    "mme.limits",
    "mme.shards",
    "mme.manifest",
    "mme.models",
    "mme.imageops",
    "mme.distributed",
    "mme.cpuisa",
    "mme.env",
    "mme.arguments",  # every command's flags, generated from mme.config (no torch for --help)
)
APP = ("mme.app", "mme.cli", "mme.__main__")  # + the package root mme/__init__.py, see below
# Arrows allowed between two stages (pipeline order: ingest -> protection -> countermeasures
# -> victim; track is what every stage logs to). Any other stage -> stage import fails.
STAGE_ARROWS = {
    ("protection", "track"): "mme poison logs its rounds and outputs to MLflow",
    ("victim", "track"): "mme train / evaluate log to MLflow and draw the recall picture",
    ("countermeasures", "track"): "a countermeasure may log what it did",
    ("ingest", "track"): "mme prepare may log what it read",
    ("countermeasures", "protection"): "the data user's side may read how a method places "
    "its trigger (it comes after protection)",
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


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
    for stage in (*STAGES, "app", "config"):
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


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports: ``from mme import fsio`` is
    ``mme.fsio``, ``from mme import __version__`` is the package root ``mme``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                names.add(full if full in modules else node.module)
    return names & modules


def mme_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "mme").rglob("*.py")}
    return {name: module_imports(path, set(files)) for name, path in files.items()}


def layer(module: str) -> tuple[int, str]:
    """``(rank, name)``: core 0, a stage 1 (name: the stage), app 2."""
    if module == "mme" or module.startswith(APP):
        return 2, "app"
    if any(module == c or module.startswith(c + ".") for c in CORE):
        return 0, "core"
    stage = module.split(".")[1]
    assert stage in STAGES, f"{module}: not in a layer (add it to CORE, STAGES or APP)"
    return 1, stage


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_mme_imports_have_no_cycle():
    """Issue 22: every stage imported mme.api, which imported the stages back; plan <-> protect."""
    assert find_cycle(mme_graph()) == []


def test_imports_only_point_down_the_layers():
    """core -> stages -> app: no module imports a higher layer, and a stage imports another
    stage only along :data:`STAGE_ARROWS` (issue 22: config -> victim.transforms, stage ->
    mme.api)."""
    upward = []
    for module, deps in mme_graph().items():
        (rank, name) = layer(module)
        for dep in deps - {"mme"}:  # the root: __version__ and lazy names, see the next test
            dep_rank, dep_name = layer(dep)
            if dep_rank > rank or (
                dep_rank == rank == 1 and dep_name != name and (name, dep_name) not in STAGE_ARROWS
            ):
                upward.append(f"{module} -> {dep}")
    assert upward == []


def test_package_root_imports_nothing_of_mme_when_it_loads():
    """``import mme`` stays light and any module may read ``mme.__version__``: the root names
    the API lazily (``__getattr__``), it imports no mme module at load time."""
    tree = ast.parse((ROOT / "mme" / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    named = [a.name for n in top for a in n.names] + [
        n.module for n in top if isinstance(n, ast.ImportFrom) and n.module
    ]
    assert not [n for n in named if n == "mme" or n.startswith("mme.")]


def test_no_file_or_function_too_long():
    """Issue 22: poison.py was 788 lines of eight concerns. A newcomer reads a module in a
    few screens and a function in one."""
    long_files, long_functions = [], []
    for path in sorted((ROOT / "mme").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{rel}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n}")
    assert long_files == [] and long_functions == []


def test_one_word_per_concept():
    """The protector's algorithms are *methods*, what a data user does is a *countermeasure*
    (``mme attack``): no name on the protector's side says "attack" (issue 22)."""
    protector = [*(ROOT / "mme" / "protection").rglob("*"), *(ROOT / "mme" / "app").rglob("*")]
    assert [p.name for p in protector if "attack" in p.name] == []
    assert sorted(p.name for p in (ROOT / "tests").glob("test_*attack*")) == []
    classes = [
        node.name
        for path in [*(ROOT / "mme").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    ]
    assert classes.count("Plan") <= 1  # flows/tasks.py's; mme protect's is ProtectPlan
