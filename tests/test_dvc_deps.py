"""dvc.yaml's code dependencies are checked against the code (issue 22): every stage's ``deps``
cover the ``mme`` modules its command imports, transitively, read from the AST the way
``tests/test_layout.py`` reads the layers. A stage whose command runs a module that is not in
its ``deps`` would stay "up to date" after that module changed; before this test ``poison``
listed 20 code paths and ``poison_baseline``, the same command, 8."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_layout import ROOT, mme_graph

from mme.cli import COMMANDS

# Imported by the commands, yet no out of any stage depends on them; a change there must not
# re-run hours of poisoning and training.
NOT_OUTPUT = {"mme.track.tracking": "MLflow logging: nothing it does reaches a stage's outs"}
COMMAND = re.compile(r"(?:^|\s)(?:-m\s+)?mme\s+([a-z]+)(?=\s|$)")


def stages() -> dict[str, dict]:
    """Every stage of dvc.yaml; a ``foreach`` stage by its ``do`` body."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


def command_of(cmd: str) -> str | None:
    """The ``mme`` subcommand a stage runs (``mme prepare``, ``torchrun ... -m mme poison``)."""
    found = COMMAND.findall(" ".join(cmd.split()))
    assert len(found) <= 1, f"one mme command per stage: {cmd}"
    return found[0] if found else None


def module_path(module: str) -> str:
    """``mme.config`` -> ``mme/config/__init__.py``; ``mme.fsio`` -> ``mme/fsio.py``."""
    base = Path(*module.split("."))
    package = base / "__init__.py"
    return (package if (ROOT / package).is_file() else base.with_suffix(".py")).as_posix()


def closure(starts: set[str], edges: dict[str, set[str]]) -> set[str]:
    """``starts`` and every module they import, directly or not, with the packages above each
    (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``). The root ``mme`` runs
    its lazy imports (the API) only when an API name is used, so its edges are not followed."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if module != "mme":
            todo += edges.get(module, ())
    return seen


def modules_run_by(command: str, edges: dict[str, set[str]]) -> set[str]:
    """What ``mme COMMAND`` imports: the CLI, the command's module and its flags' module."""
    module, _, flags = COMMANDS[command]
    starts = {"mme.cli", "mme.__main__", module, flags.partition(":")[0]}
    return closure(starts, edges) - set(NOT_OUTPUT)


def covers(deps: list[str], path: str) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_closure_follows_imports_and_packages() -> None:
    edges = {"mme.a.b": {"mme.c"}, "mme.c": {"mme.d"}, "mme": {"mme.app"}}
    assert closure({"mme.a.b"}, edges) == {"mme", "mme.a", "mme.a.b", "mme.c", "mme.d"}


@pytest.mark.parametrize(
    "cmd, command",
    [
        ("MLFLOW_EXPERIMENT_NAME=${tracking.experiment} mme prepare", "prepare"),
        ("X=1\ntorchrun --standalone --nproc_per_node ${poison.nproc} -m mme poison", "poison"),
        ("mme evaluate --checkpoint runs/x/checkpoint.pt", "evaluate"),
        ("echo nothing of ours", None),
    ],
)
def test_command_of(cmd: str, command: str | None) -> None:
    assert command_of(cmd) == command


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_cover_the_modules_its_command_imports(name: str) -> None:
    stage = stages()[name]
    command = command_of(stage["cmd"])
    assert command in COMMANDS, f"{name}: runs no mme command"
    deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
    missing = sorted(
        p for p in map(module_path, modules_run_by(command, mme_graph())) if not covers(deps, p)
    )
    assert missing == [], f"dvc.yaml stage {name} (mme {command}) lacks deps: {missing}"


def test_stages_of_one_command_depend_on_the_same_code() -> None:
    """poison and poison_baseline run the same code: their lists must not drift apart."""
    code: dict[str, dict[str, list[str]]] = {}
    for name, stage in stages().items():
        mine = sorted(d for d in stage.get("deps", []) if d.startswith("mme/"))
        code.setdefault(command_of(stage["cmd"]) or "", {})[name] = mine
    drift = {cmd: lists for cmd, lists in code.items() if len(set(map(tuple, lists.values()))) > 1}
    assert drift == {}
