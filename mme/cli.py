"""Command line: ``mme SUBCOMMAND`` / ``python -m mme SUBCOMMAND``.

Each subcommand lives in its module (a stage's, or the app's), which provides
``add_arguments(parser)`` and ``run(args) -> int``. Flags of the stages that need torch are
declared in :mod:`mme.arguments`, and a module is imported only when its subcommand runs, so
``--help`` and every parse error answer without loading torch (``mme poison --help`` well under
a second).

Every user error is one line ``mme COMMAND: what is wrong: how to fix it`` and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from mme import __version__, env
from mme.config import ConfigError, PoisonConfig

# name -> (module with run(), help, where its add_arguments lives)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "protect": (
        "mme.app.protect_cli",
        "protect your photos in one go: prepare, poison, verify, publish (each photo back at "
        "its own name, size and format)",
        "mme.app.protect_cli",
    ),
    "prepare": (
        "mme.ingest.prepare",
        "ingest a dataset into WebDataset shards + manifest",
        "mme.ingest.prepare",
    ),
    "poison": (
        "mme.protection.poison",
        "protect a dataset (MEM and baselines)",
        "mme.arguments:poison",
    ),
    "verify": (
        "mme.protection.verify",
        "check protected images against their clean sources",
        "mme.arguments:verify",
    ),
    "export": (
        "mme.protection.export",
        "write a protected set as plain files for publishing",
        "mme.protection.export",
    ),
    "attack": (
        "mme.countermeasures.apply",
        "write a transformed copy of a protected set (JPEG, resize, trigger detection, ...)",
        "mme.countermeasures.apply",
    ),
    "train": (
        "mme.victim.train",
        "train a victim CLIP on shards with open_clip_train",
        "mme.arguments:train",
    ),
    "evaluate": (
        "mme.victim.evaluate",
        "image<->text retrieval metrics on a clean test split",
        "mme.arguments:evaluate",
    ),
    "report": ("mme.track.report", "comparison table of tracked runs (MLflow)", "mme.track.report"),
    "bench": (
        "mme.app.bench",
        "time each phase (poisoning, I/O, victim) on the current device",
        "mme.arguments:bench",
    ),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``mme poison: --epsilon: ...; see --help``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def versions() -> str:
    """``mme X`` plus the versions that decide results: torch, open_clip, CUDA."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"mme {__version__}"]
    for dist, label in (("torch", "torch"), ("open_clip_torch", "open_clip")):
        try:
            parts.append(f"{label} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{label} not installed")
    try:
        import torch

        cuda = (
            f"CUDA {torch.version.cuda} ({torch.cuda.get_device_name(0)})"
            if torch.cuda.is_available()
            else "CUDA not available"
        )
    except ImportError:
        cuda = "CUDA unknown (no torch)"
    return ", ".join(parts + [cuda])


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print versions and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        print(versions())
        parser.exit(0)


def _arguments_function(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "add_arguments")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="mme",
        description="Multimodal unlearnable examples (MEM): protect image-caption data. "
        "Start with `mme protect PHOTOS OUT` (`mme protect --help`).",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (_, help_text, args_spec) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # flags of the command that is about to run only
            _arguments_function(args_spec)(p)
    return parser


def kernel_isa(args: argparse.Namespace) -> str | None:
    """The CPU kernel level the command runs (mme/cpuisa.py): ``poison.cpu_isa`` for
    ``mme poison``, its default for ``mme protect``, none (left as it is) for the others."""
    if args.command == "poison":
        from mme.config import section_from_args

        return section_from_args("poison", args).cpu_isa
    if args.command == "protect":
        return PoisonConfig.model_fields["cpu_isa"].default
    return None


def main(argv: list[str] | None = None) -> int:
    env.prepare_process_env()  # before anything can load torch, --help included (mme/env.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        env.prepare_process_env(kernel_isa(args))  # the command's kernels, still before torch
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except ConfigError as err:
        print(f"mme {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mme {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
