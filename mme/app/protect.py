"""``mme protect INPUT OUTPUT``: one command from your photos to a publishable protected folder.

It calls the stages in order, unchanged: ``prepare`` (INPUT -> clean shards) -> ``poison`` (the
method with the device's profile, :data:`mme.config.PROTECT_PROFILES`) -> ``verify`` (every
image against its clean source at the working size) -> ``publish`` (OUTPUT; by default your
photos under their own names, at their own size and format, :mod:`mme.app.publish`, checked again
at that size before OUTPUT appears; ``format: working`` / ``shards``: the square working-size set
as ``<id>.png`` files or WebDataset shards).

INPUT is a folder of images with same-named ``.txt`` captions (one per line), a caption CSV (one
row per caption; image paths relative to the CSV), a folder of WebDataset shards, or a local
Hugging Face ``datasets`` folder (``save_to_disk``) or parquet file(s).

Everything that must NOT be published goes to the private work area next to OUTPUT
(``OUTPUT.private/`` unless ``--private`` says otherwise): the clean shards, the protected
working-size shards, ``noise/`` with ``noise.npy`` (anyone holding it can subtract the noise),
``triggers.json`` and ``grid.png``, ``summary/before_after.png``, the verify reports and the run
state that ``--resume`` continues from. A failed or interrupted run can always be continued with
``--resume`` or replaced with ``--force``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mme import fsio, guard
from mme.app.settings import (
    ProtectConfig,
    ProtectResult,
    data_config,
    poison_config,
    publish_settings,
    resolve_profile,
    settings_hash,
)
from mme.config import ConfigError

STAGES = ("prepare", "poison", "verify", "publish")
STATE = "protect.json"
VERIFY_REPORT = "verify.json"
NATIVE_REPORT = "verify-native.json"
OWNER = "mme protect"
PRIVATE_README = """KEEP THIS FOLDER PRIVATE. Do not publish, upload or share it.

clean/      your original images and captions as shards
protected/  the protected shards at the working size
noise/      noise.npy (the exact noise: anyone holding it can subtract it and undo the
            protection), triggers.json, grid.png (clean | noise | protected)
summary/    before_after.png: original | protected | amplified difference, at full size
verify.json, verify-native.json  the checks of every protected image against its original
protect.json  the run state (mme protect --resume continues from it)

Check the published folder again with: mme verify --run THIS_FOLDER --native OUTPUT
Publish only the output folder that `mme protect` printed.
"""


# ------------------------------------------------------------------------------ ownership
# mme protect's two folders go through the one output guard (mme.guard): OUTPUT, and the
# private area tied to it; neither is ever a folder mme protect did not make.


def folders(cfg: ProtectConfig) -> tuple[guard.Folder, guard.Folder]:
    """OUTPUT (built beside it, replacing an earlier ``mme protect`` output; outputs of older
    versions were marked ``mme export``) and the private area, tied to OUTPUT."""
    published = guard.Folder(Path(cfg.output), "out", "OUTPUT", staged=True, legacy=("mme export",))
    private = guard.Folder(cfg.private_dir, "private", "--private", tied_to=Path(cfg.output))
    return published, private


def _occupied(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def check_paths(cfg: ProtectConfig, resume: bool) -> None:
    """Before any work: INPUT, OUTPUT and the private area must not overlap, and an earlier
    run's folders are replaced only with --force (continued with --resume), never a folder
    that mme protect did not make."""
    guard.check(OWNER, folders(cfg), {"INPUT": cfg.input})
    private, output = cfg.private_dir, Path(cfg.output)
    if cfg.force or resume:
        return
    if _occupied(private):
        raise ConfigError(
            f"{private} holds an earlier run: pass --resume to continue it or --force to start over"
        )
    if _occupied(output):
        raise ConfigError(f"output {output} exists and is not empty: pass --force to replace it")


# ---------------------------------------------------------------------------------- state


def _read_state(cfg: ProtectConfig, resume: bool) -> dict[str, Any]:
    path = cfg.private_dir / STATE
    want = settings_hash(cfg)
    if resume and path.is_file():
        state = json.loads(path.read_text())
        if state.get("settings") != want:
            raise ConfigError(
                f"--resume: {path} was made with other settings or input: match them, "
                "or pass --force to start over"
            )
        if state.get("publish") != publish_settings(cfg) and "publish" in state["done"]:
            state["done"].remove("publish")  # e.g. --resume --jpeg-quality 100: publish again
        state["publish"] = publish_settings(cfg)
        return state
    if cfg.private_dir.exists() and (cfg.force or resume):  # ours (checked), held locked
        shutil.rmtree(cfg.private_dir)  # a failed run's leftovers too; marked again next
    return {"settings": want, "publish": publish_settings(cfg), "done": [], "results": {}}


def _save_state(cfg: ProtectConfig, state: dict[str, Any]) -> None:
    fsio.write_json(cfg.private_dir / STATE, state)


def check_input(cfg: ProtectConfig) -> None:
    """INPUT can be read and holds at least one image: else one line naming the fix."""
    from mme.ingest.prepare import check_inputs, raw_items

    dcfg = data_config(cfg)
    check_inputs(dcfg)
    try:
        first = next(iter(raw_items(dcfg)), None)
    except (ValueError, OSError) as err:
        fix = ": pass --image-column / --caption-column" if "no column" in str(err) else ""
        raise ConfigError(f"{err}{fix}") from None
    if first is None:
        raise ConfigError(
            f"no images in {cfg.input}: give a folder of photos, each with a same-named .txt "
            "of captions (or a caption CSV)"
        )


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


def _stage_poison(cfg: ProtectConfig, resume: bool, on_round: Any) -> dict[str, Any]:
    from mme.protection.poison import poison

    def keep_report(report: Any) -> None:  # poison verifies its output once: keep that report
        fsio.write_json(cfg.private_dir / VERIFY_REPORT, report.to_dict())

    manifest = poison(poison_config(cfg), resume, on_round=on_round, on_verified=keep_report)
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


def _stage_publish(cfg: ProtectConfig, hooks: RunHooks) -> dict[str, Any]:
    """OUTPUT, built in a hidden folder beside it and renamed into place once complete (and,
    native, verified at each photo's own size)."""
    published, private = folders(cfg)
    out, inputs = published.path, {"INPUT": cfg.input, "the private area": private.path}
    with guard.claim(OWNER, [published], inputs, settings=settings_hash(cfg)) as claim:
        staging = fsio.staging_dir(out)
        try:
            result = _publish_into(cfg, staging, hooks)
            claim.mark(staging, published)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsio.replace_dir(staging, out)
    return result


def _publish_into(cfg: ProtectConfig, staging: Path, hooks: RunHooks) -> dict[str, Any]:
    private = cfg.private_dir
    if cfg.format != "native":
        from mme.protection.export import export

        fmt = "folder" if cfg.format == "working" else "webdataset"
        done = export(private / "protected", private / "export", fmt, force=True)
        (private / "export" / fsio.OWNER).unlink(missing_ok=True)
        staging.rmdir()
        shutil.move(private / "export", staging)  # another disk, with --private: a copy
        return {"captions": sum(c["captions"] or 0 for c in done["splits"].values())}
    from mme.app.publish import publish
    from mme.protection.native import set_geometry, verify_native

    result = publish(cfg, staging, private / "summary")
    eps = set_geometry(private / "protected")[0]
    report = verify_native(private / "clean", staging, eps, private=private / "noise")
    fsio.write_json(private / NATIVE_REPORT, report.to_dict())
    if not report.ok and (hooks.check_kept or set(report.problems) != {"kept"}):
        _failed_check(report)
    return {**result, "kept_min": report.kept_min, "native_max_linf": report.max_linf}


def _failed_check(report: Any) -> None:
    """Stop: a JPEG that lost the noise is the user's setting to change; anything else a bug."""
    if set(report.problems) == {"kept"}:
        raise ConfigError(
            f"JPEG files kept only {report.kept_min:.0%} of the noise (e.g. "
            f"{report.problems['kept'][0]}): run again with --resume --jpeg-quality 100, or "
            "--format working for lossless PNGs"
        )
    kinds = "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in report.problems.items())
    raise RuntimeError(f"the published photos failed their check ({kinds}): see {NATIVE_REPORT}")


@dataclass(frozen=True)
class RunHooks:
    """What a caller of :func:`protect` may add: ``on_round(r, stats)`` after each poison round;
    ``check_kept`` False lets JPEGs that kept too little of the noise through (the time probe
    of ``--dry-run``, whose short schedule makes a smaller noise than the run's)."""

    on_round: Callable[[int, dict[str, float]], None] | None = None
    check_kept: bool = True


def protect(
    cfg: ProtectConfig, resume: bool = False, hooks: RunHooks | None = None
) -> ProtectResult:
    """Prepare -> poison -> verify -> publish ``cfg.input`` into ``cfg.output`` (module doc).

    MLflow tracking is off unless ``MME_TRACKING`` asks for it: a data owner's run should not
    leave an ``mlflow.db`` in the folder it was started from.
    """
    if "MME_TRACKING" not in os.environ:
        os.environ["MME_TRACKING"] = "off"
        try:
            return protect(cfg, resume, hooks)
        finally:
            del os.environ["MME_TRACKING"]
    t0 = time.perf_counter()
    check_paths(cfg, resume)
    data_config(cfg), poison_config(cfg)  # validate every setting before any work
    check_input(cfg)
    private, inputs = folders(cfg)[1], {"INPUT": cfg.input}
    try:
        with guard.claim(OWNER, [private], inputs, settings=settings_hash(cfg)) as claim:
            state = _run_stages(cfg, resume, hooks or RunHooks(), claim)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise ConfigError(
            f"no space left on the disk of {err.filename or cfg.private_dir}: free some space "
            "(or pass --private on a larger disk), then run again with --resume"
        ) from None
    return _result(cfg, state, time.perf_counter() - t0)


def _run_stages(
    cfg: ProtectConfig, resume: bool, hooks: RunHooks, claim: guard.Claim
) -> dict[str, Any]:
    state = _read_state(cfg, resume)
    cfg.private_dir.mkdir(parents=True, exist_ok=True)
    claim.mark(cfg.private_dir, folders(cfg)[1])  # first: a failed run leaves a folder it owns
    fsio.write_text(cfg.private_dir / "README.txt", PRIVATE_README)
    _save_state(cfg, state)
    runners = {
        "prepare": lambda: _stage_prepare(cfg),
        "poison": lambda: _stage_poison(cfg, resume and "prepare" in state["done"], hooks.on_round),
        "verify": lambda: _stage_verify(cfg),
        "publish": lambda: _stage_publish(cfg, hooks),
    }
    for i, stage in enumerate(STAGES, 1):
        if stage in state["done"]:
            print(f"mme protect: [{i}/4] {stage}: done earlier (--resume)", file=sys.stderr)
            continue
        print(f"mme protect: [{i}/4] {stage} ...", file=sys.stderr)
        t0 = time.perf_counter()
        state["results"][stage] = runners[stage]()
        state.setdefault("seconds", {})[stage] = time.perf_counter() - t0
        state["done"].append(stage)
        _save_state(cfg, state)
    return state


def _result(cfg: ProtectConfig, state: dict[str, Any], seconds: float) -> ProtectResult:
    pcfg, r = poison_config(cfg), state["results"]

    def mean(q: str) -> float | None:
        m = r["verify"][q]["mean"]
        return float(m) if isinstance(m, int | float) else None

    return ProtectResult(
        output=cfg.output,
        private=cfg.private_dir,
        images=r["prepare"]["images"],
        captions=r["publish"]["captions"],
        protected=r["poison"]["protected"],
        skipped=r["prepare"]["skipped"],
        method=pcfg.method,
        profile=resolve_profile(cfg),
        epsilon=pcfg.epsilon,
        working_size=r["poison"]["working_size"],
        max_linf=r["verify"]["max_linf"],
        psnr_mean=mean("psnr"),
        ssim_mean=mean("ssim"),
        format=cfg.format,
        formats=r["publish"].get("formats", {}),
        kept_min=r["publish"].get("kept_min"),
        verified=bool(r["verify"]["ok"]),
        seconds=seconds,
        stage_seconds=state.get("seconds", {}),
    )
