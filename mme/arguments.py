"""Command-line flags of the stages whose modules import torch.

Kept here, in a module that imports only argparse and :mod:`mme.config`, so ``mme poison --help``
(or any parse error) answers without loading torch or open_clip; each stage module's
``add_arguments`` is the function of the same name below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mme.config import add_model_arguments, add_section_arguments


def poison(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue a killed run")
    add_section_arguments(parser, "poison")


def verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        type=Path,
        default=None,
        metavar="PRIVATE",
        help="the private area of an `mme protect` run: its clean, protected and noise "
        "folders stand for --clean, --protected and --private (default: none)",
    )
    parser.add_argument(
        "--clean", type=Path, default=None, help="clean shard folder (mme prepare; required)"
    )
    parser.add_argument(
        "--protected", type=Path, default=None, help="protected set (mme poison; required)"
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="L-inf bound to check, 0-255 units (default: the one the run recorded in"
        " --private's triggers.json; needed without it: a set cannot vouch for its own bound)",
    )
    parser.add_argument(
        "--private",
        type=Path,
        default=None,
        help="the run's private folder (noise.npy, triggers.json): adds the noise checks",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument(
        "--native",
        type=Path,
        default=None,
        help="also check this published folder (`mme protect`, `mme export --native`) against "
        "the clean originals at their own size (default: none)",
    )


def train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="shard folder with train-*.tar (default: params.yaml data.out)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="output folder (default: runs/victim-<shards name>)",
    )
    add_section_arguments(parser, "victim")


def evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint to evaluate (default: runs/victim-<shards name>/checkpoint.pt)",
    )
    parser.add_argument(
        "--model", default=None, help="model config name (default: the checkpoint's own)"
    )
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="shard folder with the split (default: params.yaml data.out)",
    )
    parser.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    parser.add_argument(
        "--out", type=Path, default=None, help="metrics file (default: next to the checkpoint)"
    )
    add_section_arguments(parser, "evaluate")


def bench(parser: argparse.ArgumentParser) -> None:
    from mme.config import BenchConfig

    group = parser.add_argument_group("bench settings", "a flag replaces its default")
    add_model_arguments(group, BenchConfig, lists={"phases": "PHASE"})
