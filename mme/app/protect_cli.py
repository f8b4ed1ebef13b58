"""``mme protect``'s command line: its flags (every default shown in ``--help``, without
loading torch) and the run (:func:`mme.app.protect.protect`, or the plan with ``--dry-run``)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mme.app.settings import FIXED, ProtectConfig, poison_config
from mme.config import (
    PROTECT_PROFILES,
    ConfigError,
    PoisonConfig,
    add_section_arguments,
    params_file,
    show_default,
)

# ProtectConfig fields that are flags of their own (the poison settings come from the model)
OWN = {"profile": None, "format": None, "jpeg_quality": "N", "max_side": "N",
       "image_column": "TEXT", "caption_column": "TEXT"}  # fmt: skip


def profile_defaults() -> dict[str, str]:
    """Each poison flag's default as ``--help`` shows it: the cpu and gpu profiles' values."""
    cpu, gpu = PROTECT_PROFILES["cpu"], PROTECT_PROFILES["gpu"]
    shown: dict[str, str] = {}
    for key in sorted({*cpu, *gpu}):
        base = PoisonConfig.model_fields[key].default
        a, b = show_default(cpu.get(key, base)), show_default(gpu.get(key, base))
        shown[key] = a if a == b else f"{a} with the cpu profile, {b} with gpu"
    shown["threads"] = "all usable cores"
    return shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", type=Path, help="image folder (+ .txt captions), CSV, shards, or HF dataset"
    )
    parser.add_argument("output", type=Path, help="publishable folder to write")
    parser.add_argument(
        "--private", type=Path, default=None, metavar="DIR",
        help="private work area (default: OUTPUT.private)",
    )  # fmt: skip
    for flag, text in (
        ("--resume", "continue a failed or interrupted run"),
        ("--dry-run", "print the plan, what is skipped, a measured time estimate, disk; stop"),
        ("--force", "replace OUTPUT and the private area of an earlier run, start over"),
        ("--keep-exif", "keep the photos' EXIF (GPS, camera, dates); without it all is removed"),
    ):
        parser.add_argument(flag, action="store_true", help=f"{text} (default: off)")
    for name, metavar in OWN.items():
        field = ProtectConfig.model_fields[name]
        choices = None if metavar else [str(c) for c in field.annotation.__args__]
        parser.add_argument(
            "--" + name.replace("_", "-"), default=field.default, metavar=metavar,
            choices=choices, type=int if metavar == "N" else str,
            help=f"{field.description} (default: {show_default(field.default)})",
        )  # fmt: skip
    parser.add_argument(
        "--params", type=params_file, default=None, metavar="FILE",
        help="use this file's poison: section (default: none; ./params.yaml is not read)",
    )  # fmt: skip
    add_section_arguments(
        parser, "poison", skip=FIXED, defaults=profile_defaults(), origin="the --profile values"
    )


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    from mme.config import read_params

    names = PoisonConfig.model_fields
    # protect's own --private (its work area) is not poison.private: FIXED keys are its own
    given = vars(args).items()
    overrides = {k: v for k, v in given if k in names and k not in FIXED and v is not None}
    # a params file only when named: protect's defaults are the profile's, not the repo's
    base = dict(read_params(args.params).get("poison") or {}) if args.params else {}
    base = {k: v for k, v in base.items() if k not in FIXED}
    own = {k: getattr(args, k) for k in OWN}
    return ProtectConfig(
        input=args.input,
        output=args.output,
        private=args.private,
        poison={**base, **overrides},
        keep_exif=args.keep_exif,
        force=args.force,
        **own,
    )


def _check_disk(need: int, folder: Path) -> None:
    where = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(
            f"the run needs ~{need / 1e6:.0f} MB on {where}, {free / 1e6:.0f} MB are free: "
            "free some space or pass --private on a larger disk"
        )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mme.app.plan import plan
    from mme.app.protect import check_input, check_paths, protect
    from mme.config import format_validation_error

    try:
        cfg = config_from_args(args)
    except ValidationError as err:
        raise ConfigError(format_validation_error("protect", err)) from None
    try:
        poison_config(cfg)
    except ValidationError as err:
        raise ConfigError(format_validation_error("poison", err)) from None
    if not args.dry_run:
        check_paths(cfg, args.resume)  # user errors first
    check_input(cfg)
    p = plan(cfg, probe=args.dry_run)
    if args.dry_run:
        print(p.text())
    if not p.images:
        raise ConfigError(
            f"no usable image with captions in {cfg.input}: each image needs captions (a "
            "same-named .txt, one per line, or rows of a caption CSV); --dry-run lists the skips"
        )
    if p.probe_error is not None:  # the run would stop the same way: say so as an error
        raise ConfigError(f"the time probe stopped, as the run would: {p.probe_error}")
    if args.dry_run:
        return 0
    if not args.resume:
        _check_disk(p.disk_bytes, cfg.private_dir)
        skips = ", ".join(f"{r} {n}" for r, n in p.scan.skip_counts.items()) or "none"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(p.scan.formats.items()))
        print(
            f"mme protect: {p.images} images ({kinds}), skipping {skips}; "
            f"~{p.disk_bytes / 1e6:.0f} MB disk; profile {p.profile} (--dry-run estimates the "
            "time)",
            file=sys.stderr,
        )
    result = protect(cfg, resume=args.resume)
    print(result.summary())
    return 0 if result.verified else 1
