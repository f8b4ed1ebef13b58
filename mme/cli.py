"""Command line: ``mme SUBCOMMAND`` / ``python -m mme SUBCOMMAND``.

Each subcommand lives in its stage module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``mme --help`` is
fast and heavy optional imports (MLflow) stay out of the compute path.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mme import __version__
from mme.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("mme.prepare", "ingest a dataset into WebDataset shards + manifest"),
    "poison": ("mme.poison", "protect a dataset (MEM and baselines)"),
    "verify": ("mme.verify", "check protected images against their clean sources"),
    "export": ("mme.export", "write a protected set as plain files for publishing"),
    "attack": ("mme.attack", "write a transformed copy of a protected set (JPEG, resize, ...)"),
    "train": ("mme.victim", "train a victim CLIP on shards with open_clip_train"),
    "evaluate": ("mme.evaluate", "image<->text retrieval metrics on a clean test split"),
    "report": ("mme.report", "comparison table of tracked runs (MLflow)"),
    "bench": ("mme.bench", "time each phase (poisoning, I/O, victim) on the current device"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mme",
        description="Multimodal unlearnable examples (MEM): protect image-caption data.",
    )
    parser.add_argument("--version", action="version", version=f"mme {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # import only the module that is about to run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except ConfigError as err:
        print(f"mme {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mme {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
