"""``mme protect INPUT OUTPUT``: one command from your photos to a publishable protected folder.

It calls the stages in order, unchanged: ``prepare`` (INPUT -> clean shards) -> ``poison`` (MEM
with :data:`mme.config.PHOTO_PROFILE`, the defaults meant for real photos) -> ``verify`` (every
image against its clean source: L-inf <= epsilon, trigger and caption checks, PSNR/SSIM) ->
``export`` (OUTPUT: ``<id>.png`` + ``<id>.txt`` + ``metadata.jsonl`` + ``README.txt``).

INPUT is a folder of images with same-named ``.txt`` captions (one per line), a caption CSV (one
row per caption; image paths relative to the CSV), a folder of WebDataset shards, or a local
Hugging Face ``datasets`` folder (``save_to_disk``) or parquet file(s).

Everything that must NOT be published goes to the private work area next to OUTPUT
(``OUTPUT.private/`` unless ``--private`` says otherwise): the clean shards, the protected shards
(the staging copy of the export), ``noise/`` with ``noise.npy`` (anyone holding it can subtract
the noise), ``triggers.json`` and ``grid.png``, the verify
report and the run state that ``--resume`` continues from. ``--dry-run`` prints the plan, a time
estimate and the disk needed, and does nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mme import fsio, guard
from mme.app.settings import (
    FIXED,
    ProtectConfig,
    ProtectResult,
    data_config,
    poison_config,
    settings_hash,
)
from mme.config import PHOTO_PROFILE, ConfigError, PoisonConfig, add_section_arguments, params_file

OWNER = "mme protect"
STAGES = ("prepare", "poison", "verify", "export")
STATE = "protect.json"
VERIFY_REPORT = "verify.json"
PRIVATE_README = """KEEP THIS FOLDER PRIVATE. Do not publish, upload or share it.

clean/      your original images and captions as shards
protected/  the protected shards (what the output folder was exported from)
noise/      noise.npy (the exact noise: anyone holding it can subtract it and undo the
            protection), triggers.json, grid.png (clean | noise | protected)
verify.json the check of every protected image against its original
protect.json  the run state (mme protect --resume continues from it)

Publish only the output folder that `mme protect` printed.
"""


def folders(cfg: ProtectConfig) -> tuple[guard.Folder, guard.Folder]:
    """OUTPUT (an earlier ``mme protect`` output, replaced with --force) and the private area
    (made by ``mme protect`` for this OUTPUT), for :mod:`mme.guard`."""
    published = guard.Folder(Path(cfg.output), "out", "OUTPUT", needs_force=True)
    private = guard.Folder(cfg.private_dir, "private", "--private", tied_to=Path(cfg.output))
    return published, private


def check_paths(cfg: ProtectConfig, resume: bool) -> None:
    """Before any work: INPUT, OUTPUT and the private area must not overlap or clash."""
    state = cfg.private_dir / STATE
    if state.exists() and not (cfg.force or resume):
        raise ConfigError(
            f"{cfg.private_dir} holds an earlier run: pass --resume to continue it "
            "or --force to start over"
        )
    # never write into (or, with --force, delete) a folder we did not make
    guard.check(OWNER, folders(cfg), {"INPUT": cfg.input}, force=cfg.force or resume)


# ---------------------------------------------------------------------------------- state


def _read_state(cfg: ProtectConfig, resume: bool) -> dict[str, Any]:
    path = cfg.private_dir / STATE
    want = settings_hash(cfg)
    if resume and path.exists():
        state = json.loads(path.read_text())
        if state.get("settings") != want:
            raise ConfigError(
                f"--resume: {path} was made with other settings or input: match them, "
                "or pass --force to start over"
            )
        return state
    if cfg.force and cfg.private_dir.exists():  # checked: made by mme protect for OUTPUT
        for entry in cfg.private_dir.iterdir():  # all but its marker
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != fsio.OWNER:
                entry.unlink()
    return {"settings": want, "done": [], "results": {}}


def _save_state(cfg: ProtectConfig, state: dict[str, Any]) -> None:
    fsio.write_json(cfg.private_dir / STATE, state)


# ----------------------------------------------------------------------------------- stages


def _stage_prepare(cfg: ProtectConfig) -> dict[str, Any]:
    from mme.ingest.prepare import prepare

    dcfg = data_config(cfg)
    try:
        manifest = prepare(dcfg)
    except SystemExit as stop:  # prepare's "no usable images": a user error here
        raise ConfigError(
            f"no usable image with captions in {cfg.input}: each image needs captions "
            "(a same-named .txt, one per line, or rows of a caption CSV)"
        ) from stop
    return {"images": manifest["splits"]["train"]["images"], "skipped": manifest["skipped_counts"]}


def _stage_poison(cfg: ProtectConfig, resume: bool) -> dict[str, Any]:
    from mme.protection.poison import poison

    def keep_report(report: Any) -> None:  # poison verifies its output once: keep that report
        fsio.write_json(cfg.private_dir / VERIFY_REPORT, report.to_dict())

    manifest = poison(poison_config(cfg), resume=resume, on_verified=keep_report)
    return {"protected": manifest["n_protected"], "working_size": manifest["working_size"]}


def _stage_verify(cfg: ProtectConfig) -> dict[str, Any]:
    """The check ``poison`` ran on every protected image before it wrote the manifest (its
    report, ``verify.json``); checked here again only for a run resumed from an older mme that
    kept no report."""
    private = cfg.private_dir
    path = private / VERIFY_REPORT
    if path.is_file():
        d = json.loads(path.read_text())
    else:
        from mme.protection.verify import verify

        d = verify(private / "clean", private / "protected", private=private / "noise").to_dict()
        fsio.write_json(path, d)
    if not d["ok"]:
        raise RuntimeError(f"verification failed: see {path}")
    return {k: d[k] for k in ("ok", "max_linf", "psnr", "ssim", "n_checked")}


def _stage_export(cfg: ProtectConfig) -> dict[str, Any]:
    from mme.protection.export import export

    result = export(cfg.private_dir / "protected", cfg.output, "folder", True, command=OWNER)
    return {"captions": sum(c["captions"] or 0 for c in result["splits"].values())}


def protect(cfg: ProtectConfig, resume: bool = False) -> ProtectResult:
    """Prepare -> poison -> verify -> export ``cfg.input`` into ``cfg.output`` (see module doc).

    MLflow tracking is off unless ``MME_TRACKING`` asks for it: a data owner's run should not
    leave an ``mlflow.db`` in the folder it was started from.
    """
    if "MME_TRACKING" not in os.environ:
        os.environ["MME_TRACKING"] = "off"
        try:
            return protect(cfg, resume)
        finally:
            del os.environ["MME_TRACKING"]
    t0 = time.perf_counter()
    check_paths(cfg, resume)
    data_config(cfg), poison_config(cfg)  # validate every setting before any work
    private, inputs = folders(cfg)[1], {"INPUT": cfg.input}
    settings = settings_hash(cfg)
    with guard.claim(OWNER, [private], inputs, force=cfg.force or resume, settings=settings):
        return _run_stages(cfg, resume, t0)


def _run_stages(cfg: ProtectConfig, resume: bool, t0: float) -> ProtectResult:
    state = _read_state(cfg, resume)
    fsio.write_text(cfg.private_dir / "README.txt", PRIVATE_README)
    runners = {
        "prepare": lambda: _stage_prepare(cfg),
        "poison": lambda: _stage_poison(cfg, resume),
        "verify": lambda: _stage_verify(cfg),
        "export": lambda: _stage_export(cfg),
    }
    for i, stage in enumerate(STAGES, 1):
        if stage in state["done"]:
            print(f"mme protect: [{i}/4] {stage}: done earlier (--resume)", file=sys.stderr)
            continue
        print(f"mme protect: [{i}/4] {stage} ...", file=sys.stderr)
        state["results"][stage] = runners[stage]()
        state["done"].append(stage)
        _save_state(cfg, state)
    return _result(cfg, state["results"], time.perf_counter() - t0)


def _result(cfg: ProtectConfig, r: dict[str, dict[str, Any]], seconds: float) -> ProtectResult:
    pcfg = poison_config(cfg)

    def mean(q: str) -> float | None:
        m = r["verify"][q]["mean"]
        return float(m) if isinstance(m, int | float) else None

    return ProtectResult(
        output=cfg.output,
        private=cfg.private_dir,
        images=r["prepare"]["images"],
        captions=r["export"]["captions"],
        protected=r["poison"]["protected"],
        skipped=r["prepare"]["skipped"],
        method=pcfg.method,
        epsilon=pcfg.epsilon,
        working_size=r["poison"]["working_size"],
        max_linf=r["verify"]["max_linf"],
        psnr_mean=mean("psnr"),
        ssim_mean=mean("ssim"),
        verified=bool(r["verify"]["ok"]),
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", type=Path, help="image folder (+ .txt captions), CSV, shards, or HF dataset"
    )
    parser.add_argument("output", type=Path, help="publishable folder to write")
    parser.add_argument(
        "--private",
        type=Path,
        default=None,
        metavar="DIR",
        help="private work area (default: OUTPUT.private)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--dry-run", action="store_true", help="print plan, time, disk; stop")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT, start over")
    parser.add_argument(
        "--max-side", type=int, default=None, metavar="N", help="shrink inputs first (short side)"
    )
    parser.add_argument(
        "--image-column", default="images", metavar="TEXT", help="CSV: image path column"
    )
    parser.add_argument(
        "--caption-column", default="caption", metavar="TEXT", help="CSV: caption column"
    )
    parser.add_argument(
        "--params",
        type=params_file,
        default=None,
        metavar="FILE",
        help="use this file's poison: section (default: none; ./params.yaml is not read)",
    )
    add_section_arguments(parser, "poison", skip=FIXED, defaults=PHOTO_PROFILE)


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    from mme.config import read_params

    names = PoisonConfig.model_fields
    # protect's own --private (its work area) is not poison.private: FIXED keys are its own
    given = vars(args).items()
    overrides = {k: v for k, v in given if k in names and k not in FIXED and v is not None}
    # a params file only when named: protect's defaults are the photo profile, not the repo's
    base = dict(read_params(args.params).get("poison") or {}) if args.params else {}
    base = {k: v for k, v in base.items() if k not in FIXED}
    return ProtectConfig(
        input=args.input,
        output=args.output,
        private=args.private,
        poison={**base, **overrides},
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_side=args.max_side,
        force=args.force,
    )


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mme.config import format_validation_error

    try:
        cfg = config_from_args(args)
        poison_config(cfg)
    except ValidationError as err:
        raise ConfigError(format_validation_error("poison", err)) from None
    if args.dry_run:
        from mme.app.plan import plan

        print(plan(cfg).text())
        return 0
    check_paths(cfg, args.resume)  # user errors before the timed pass below
    if not args.resume:
        from mme.app.plan import plan

        p = plan(cfg)  # a few seconds: one timed pass of the surrogate
        print(
            f"mme protect: {p.images} images; estimated ~{_minutes(p.estimate_seconds)} "
            f"on {p.device}, ~{p.disk_bytes / 1e6:.0f} MB disk (--dry-run shows the plan)",
            file=sys.stderr,
        )
    result = protect(cfg, resume=args.resume)
    print(result.summary())
    return 0 if result.verified else 1
