"""The time estimate of ``mme protect --dry-run``: a short timed run of the real stages.

A few of the input's own photos go through the whole of ``mme protect`` in a temporary folder
(prepare, poison with the run's method and settings on a shortened schedule, verify, publish) on
this machine, with the run's device and threads, twice: with :data:`SMALL` photos and with ``k``
(up to :data:`MAX_IMAGES`). Each stage is timed, and each poison round through poison's round
hook. The second run has :data:`ROUNDS` rounds (the first with the trigger update when the run
has one) of at most :data:`MAX_STEPS` surrogate and PGD steps; ``k`` and the steps shrink until
one timed image pass says the probe fits :data:`BUDGET_S`. Then, for the ``n`` images of the run:

- per image (times ``n``): what the two runs' time outside the rounds differs by, per photo
  (prepare, poison's loading, writing and verification, publish);
- once: what is left of the small run's time outside the rounds (model and tokenizer set-up,
  process pools);
- the rounds: ``rounds × u × (M · min(B, n) + S · n)`` image passes, ``u`` the probe's plain
  rounds' mean divided by their passes (``M``, ``S``, ``B``: surrogate steps, PGD steps,
  batch; keyed: ``(M + pattern steps) · min(B, n)``), plus ``trigger_rounds × n ×`` the extra
  time per image of the probe's trigger round;
  the small run has two rounds, so that the first round's one-off warm-up is told apart from
  the trigger update (which grows with the photos) and counted once.

With fewer than ``3 × SMALL`` photos one run is made and everything outside the rounds counts
per image. The estimate is protect's own wall time (what ``done in`` prints), not the
interpreter's start; on a machine shared with other work it moves with their load.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mme.app.settings import FIXED, ProtectConfig, poison_config
from mme.config import ConfigError, PoisonConfig

BUDGET_S = 20.0  # what the probe may take (predicted from one timed image pass)
MAX_IMAGES = 16  # photos in the probe (its per-image figures come from 16 - SMALL)
MAX_STEPS = 8  # surrogate / PGD steps per probe round
# Photos in the first, short probe run: as many as the before/after picture and grid.png show
# in both runs, so that the difference of the two runs is per-photo work only (a picture row
# at full size counted per photo made a 40-photo estimate 40 % long).
SMALL = 3
MAX_BATCH = 128  # the largest batch timed for batch_factor
ROUNDS = 3  # probe rounds: the first with the trigger update, the mean of the others plain


class Timings(BaseModel):
    """What the probe measured (seconds)."""

    images: int  # k
    setup: float  # paid once per run: model creation, process pools, ...
    per_image: float  # prepare + publish + poison's load, write and verify, per image
    per_pass: float  # one image pass of a plain round (surrogate or PGD)
    per_trigger_image: float  # the trigger update, per image and trigger round
    probe_seconds: float  # the probe's own wall time


def passes(pcfg: PoisonConfig, n: int) -> int:
    """Image passes of one plain round: M surrogate batches of min(B, n), then S PGD steps over
    the n images (keyed: ``pattern_steps`` batches of min(B, n))."""
    if pcfg.method == "keyed":
        return (pcfg.surrogate_steps + pcfg.pattern_steps) * min(pcfg.batch_size, n)
    return pcfg.surrogate_steps * min(pcfg.batch_size, n) + pcfg.pgd_steps * n


def estimate(t: Timings, pcfg: PoisonConfig, n: int) -> float:
    """Seconds for ``n`` images with ``pcfg`` (module doc)."""
    rounds = 0.0
    if pcfg.method != "random":
        trig = min(pcfg.trigger_rounds, pcfg.rounds) if pcfg.method == "mem" else 0
        rounds = pcfg.rounds * t.per_pass * passes(pcfg, n) + trig * n * t.per_trigger_image
    return t.setup + n * t.per_image + rounds


def schedule(pcfg: PoisonConfig, k: int, per_pass: float) -> tuple[int, dict[str, int]]:
    """``(k, poison overrides)`` of a probe predicted to fit :data:`BUDGET_S`."""
    inner = "pattern_steps" if pcfg.method == "keyed" else "pgd_steps"  # at least 1
    steps = {"surrogate_steps": min(pcfg.surrogate_steps, MAX_STEPS),
             inner: min(getattr(pcfg, inner), MAX_STEPS)}  # fmt: skip

    def cost() -> float:
        return per_pass * (ROUNDS * passes(pcfg.model_copy(update=steps), k) + k)

    while cost() > BUDGET_S and (k > 2 or max(steps.values()) > 1):
        if max(steps.values()) > 1:
            steps = {key: max(1 if key == inner else 0, v // 2) for key, v in steps.items()}
        else:
            k -= 1
    trig = 1 if pcfg.trigger_rounds > 0 else 0
    grid = min(SMALL, pcfg.grid_samples)  # the same in both runs (see SMALL)
    # keyed: the probe's few photos share no key word the run's thresholds would keep, and an
    # image without one is skipped (not timed); any repeated word is a key word there
    keys = {"key_min_captions": 1, "key_min_images": 1} if pcfg.method == "keyed" else {}
    return k, {**steps, "rounds": ROUNDS, "trigger_rounds": trig, "grid_samples": grid} | keys


def one_pass(pcfg: PoisonConfig, batches: tuple[int, ...] = (2,)) -> tuple[float, list[float]]:
    """``(model set-up seconds, [seconds of one image's forward + backward at each batch size]``
    measured here (synthetic pixels and text; the best of two calls after a first one)."""
    import torch

    from mme import models

    t0 = time.perf_counter()
    device = models.resolve_device(pcfg.device)
    model, tokenizer = models.create_model(pcfg.model, pcfg.pretrained, device)
    setup, size, out = time.perf_counter() - t0, models.image_size(model), []
    with models.torch_threads(pcfg.threads):
        for b in batches:
            x = torch.rand(b, 3, size, size, device=device, requires_grad=True)
            text = tokenizer(["a photo of a thing"] * b).to(device)
            best = float("inf")
            for i in range(3):  # the first call pays one-off costs
                t0 = time.perf_counter()
                img = model.encode_image(models.preprocess_images(x, model))
                (img.float().sum() + model.encode_text(text).float().sum()).backward()
                best = min(best, time.perf_counter() - t0) if i else best
            out.append(best / b)
    return setup, out


def batch_factor(pcfg: PoisonConfig, k: int, n: int) -> float:
    """Per-image time of a pass at the run's batch (min(B, n), capped at :data:`MAX_BATCH`) over
    that at the probe's (min(B, k)): a CPU does an image of a large batch faster (100 photos at
    batch 100 took 0.7x the probe's per-image time at batch 16), so the probe's rounds alone
    would overestimate a larger run."""
    small, large = min(pcfg.batch_size, k), min(pcfg.batch_size, n, MAX_BATCH)
    if large <= small:
        return 1.0
    _, (t_small, t_large) = one_pass(pcfg, (small, large))
    return min(1.0, t_large / t_small)


def write_inputs(folder: Path, items: list[tuple[str, bytes, list[str]]]) -> None:
    """The probe's photos as a folder source: ``NNN.<ext>`` + ``NNN.txt``."""
    folder.mkdir(parents=True)
    for i, (ext, data, captions) in enumerate(items):
        (folder / f"{i:03d}.{ext}").write_bytes(data)
        (folder / f"{i:03d}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")


def _timed_run(
    cfg: ProtectConfig, items: list[tuple[str, bytes, list[str]]], settings: dict[str, Any]
) -> tuple[float, list[float], float]:
    """``(seconds outside the rounds, seconds of each round, wall)`` of ``mme protect`` on
    ``items`` with the poison ``settings``, in a temporary folder, its output discarded."""
    from mme.app.protect import RunHooks, protect

    rounds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mme-probe-") as tmp:
        write_inputs(Path(tmp) / "in", items)
        run = cfg.model_copy(update={"input": Path(tmp) / "in", "output": Path(tmp) / "out",
                                     "private": None, "poison": settings,
                                     "force": False})  # fmt: skip
        t0, log = time.perf_counter(), io.StringIO()
        hooks = RunHooks(lambda r, stats: rounds.append(stats["round_seconds"]), False)
        try:
            with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
                result = protect(run, hooks=hooks)
        except ConfigError as err:  # named without the temporary folder
            raise ConfigError(str(err).replace(f"{tmp}/", "")) from None
        wall = time.perf_counter() - t0
    return sum(result.stage_seconds.values()) - sum(rounds), rounds, wall


def run_probe(
    cfg: ProtectConfig, items: list[tuple[str, bytes, list[str]]], n: int | None = None
) -> Timings:
    """Time the probe on ``items`` (``(extension, bytes, captions)`` of good photos): a run of
    :data:`SMALL` photos and one of ``k`` (two points: what each image adds, what is paid once)
    with the shortened schedule (module doc); ``n``: the run's photos (default: the items)."""
    pcfg = poison_config(cfg)
    _, (guess,) = one_pass(pcfg)
    k, overrides = schedule(pcfg, min(len(items), MAX_IMAGES), guess)
    base = pcfg.model_dump(exclude={*FIXED, "work"})
    t0 = time.perf_counter()
    rest_a, rounds_a = 0.0, [0.0, 0.0]
    two = k >= 3 * SMALL  # else too few photos apart: everything counts per image
    if two:  # two rounds: the first one's extra time is warm-up + trigger update of SMALL photos
        rest_a, rounds_a, _ = _timed_run(cfg, items[:SMALL], base | overrides | {"rounds": 2})
    rest_b, rounds, _ = _timed_run(cfg, items[:k], base | overrides)
    per_image = max(0.0, (rest_b - rest_a) / (k - SMALL) if two else rest_b / k)
    plain = sum(rounds[1:]) / (len(rounds) - 1) if len(rounds) > 1 else 0.0
    # The first round of a run also pays one-off costs (the model's first passes); what grows
    # with the photos is the trigger update. Two runs tell them apart; the rest is paid once.
    extra_a, extra_b = rounds_a[0] - rounds_a[1], rounds[0] - plain
    per_trigger = (extra_b - extra_a) / (k - SMALL) if two else extra_b / k
    per_trigger = max(0.0, per_trigger) if overrides["trigger_rounds"] else 0.0
    warm_up = max(0.0, extra_a - SMALL * per_trigger) if two else 0.0
    probe = pcfg.model_copy(update=overrides)
    return Timings(
        images=k,
        setup=max(0.0, rest_a - SMALL * per_image) + warm_up if two else 0.0,
        per_image=per_image,
        per_pass=plain / max(1, passes(probe, k)) * batch_factor(pcfg, k, n or len(items)),
        per_trigger_image=per_trigger,
        probe_seconds=time.perf_counter() - t0,
    )


def summary(t: Timings) -> dict[str, Any]:
    """The probe's figures for the plan's text."""
    return {"k": t.images, "probe_s": t.probe_seconds, "per_image_s": t.per_image,
            "per_pass_ms": 1000 * t.per_pass}  # fmt: skip
