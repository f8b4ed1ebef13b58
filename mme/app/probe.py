"""The time estimate of ``mme protect --dry-run``: a short timed run of the real stages.

A few of the input's own photos go through the whole of ``mme protect`` in a temporary folder
(prepare, poison with the run's method and settings on a shortened schedule, verify, publish) in
a fresh interpreter on this machine, with the run's device and threads, twice: with
:data:`SMALL` photos and with ``k`` (up to :data:`MAX_IMAGES`). Each stage is timed, and each
poison round through poison's round hook. The second run has :data:`ROUNDS` rounds (the first
with the trigger update when the run has one) of at most :data:`MAX_STEPS` surrogate and noise
steps; ``k`` and the steps shrink until one timed image pass says the probe fits
:data:`BUDGET_S`. Then, for the ``n`` images of the run:

- per image (times ``n``): what the two runs' time outside the rounds and their checkpoints
  differs by, per photo (prepare, poison's loading, writing and verification, publish);
- once: what is left of the small run's time outside the rounds (model and tokenizer set-up,
  process pools), plus its first round's extra time over its second (the new model's first
  passes);
- each round: every step priced from its own time in the probe's plain rounds (each round
  reports its steps' seconds): ``M · min(B, n)`` surrogate image passes, the noise step's
  passes (PGD: ``S · n``; keyed's pattern steps: ``pattern_steps · min(B, n)``; errmax: in the
  last round only), the rest of the round per image (noise written, mean |noise|) and the
  checkpoint after it (the time from a round's end to the next round's hook, less that round);
  plus ``trigger_rounds × n ×`` the first round's trigger update per image. A surrogate pass
  costs about twice a noise pass (it trains both towers; tiny-vit, keyed: 17 against 8 ms per
  image): one rate for both, with the checkpoints counted per photo, made the 40-photo keyed
  estimate of tests/test_protect.py 1.1 to 1.4 times the run (CI: ~7 s for 5.0 s).

With fewer than ``3 × SMALL`` photos one run is made and everything outside the rounds counts
per image. The estimate is protect's own wall time (what ``done in`` prints), not the
interpreter's start; on a machine shared with other work it moves with their load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

from mme import env, fsio
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
    setup: float  # paid once per run: model creation, process pools, first passes, ...
    per_image: float  # prepare + publish + poison's load, write and verify, per image
    per_surrogate_pass: float  # one image of a surrogate step (at the run's batch)
    per_noise_pass: float  # one image of a noise step: PGD, or keyed's pattern step
    per_round_image: float  # the rest of a round, per image (noise written, mean |noise|)
    per_round: float  # after each round: its checkpoint
    per_trigger_image: float  # the trigger update, per image and trigger round
    probe_seconds: float  # the probe's own wall time


NOISE_STEP = {"keyed": "pattern"}  # the stats name of each method's noise step (else "pgd")


def noise_passes(pcfg: PoisonConfig, n: int) -> int:
    """Image passes of one noise step of a round: S PGD steps over the n images (keyed:
    ``pattern_steps`` batches of min(B, n))."""
    if pcfg.method == "keyed":
        return pcfg.pattern_steps * min(pcfg.batch_size, n)
    return pcfg.pgd_steps * n


def passes(pcfg: PoisonConfig, n: int) -> int:
    """Image passes of one plain round: M surrogate batches of min(B, n), then the noise step."""
    return pcfg.surrogate_steps * min(pcfg.batch_size, n) + noise_passes(pcfg, n)


def estimate(t: Timings, pcfg: PoisonConfig, n: int) -> float:
    """Seconds for ``n`` images with ``pcfg`` (module doc)."""
    total = t.setup + n * t.per_image
    if pcfg.method == "random":
        return total
    surrogate = t.per_surrogate_pass * pcfg.surrogate_steps * min(pcfg.batch_size, n)
    each = surrogate + t.per_round_image * n + t.per_round
    noise_rounds = 1 if pcfg.method == "errmax" else pcfg.rounds  # errmax: the last round's
    trig = min(pcfg.trigger_rounds, pcfg.rounds) if pcfg.method == "mem" else 0
    noise = noise_rounds * t.per_noise_pass * noise_passes(pcfg, n)
    return total + pcfg.rounds * each + noise + trig * n * t.per_trigger_image


def schedule(pcfg: PoisonConfig, k: int, per_pass: float) -> tuple[int, dict[str, int]]:
    """``(k, poison overrides)`` of a probe predicted to fit :data:`BUDGET_S`."""
    inner = "pattern_steps" if pcfg.method == "keyed" else "pgd_steps"  # at least 1
    steps = {"surrogate_steps": min(pcfg.surrogate_steps, MAX_STEPS),
             inner: min(getattr(pcfg, inner), MAX_STEPS)}  # fmt: skip

    def cost() -> float:
        return per_pass * (ROUNDS * passes(pcfg.model_copy(update=steps), k) + k)

    # at least one step of each kind the run has: step_times prices each kind from its own
    low = {"surrogate_steps": min(1, pcfg.surrogate_steps), inner: 1}
    while cost() > BUDGET_S and (k > 2 or steps != low):
        if steps != low:
            steps = {key: max(low[key], v // 2) for key, v in steps.items()}
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


class Probed(NamedTuple):
    """One timed probe run."""

    rest: float  # seconds outside the rounds and their checkpoints
    rounds: list[dict[str, float]]  # each round's stats (its steps' seconds)
    per_round: float  # seconds after a round, before the next: its checkpoint


def _timed_run(
    cfg: ProtectConfig, items: list[tuple[str, bytes, list[str]]], settings: dict[str, Any]
) -> Probed:
    """``mme protect`` on ``items`` with the poison ``settings``, in a temporary folder, its
    output discarded, timed by stage and round."""
    from mme.app.protect import RunHooks, protect

    rounds: list[dict[str, float]] = []
    marks: list[float] = []  # when each round's hook ran: after the round and its checkpoint

    def on_round(r: int, stats: dict[str, float]) -> None:
        marks.append(time.perf_counter())
        rounds.append(dict(stats))

    with tempfile.TemporaryDirectory(prefix="mme-probe-") as tmp:
        write_inputs(Path(tmp) / "in", items)
        run = cfg.model_copy(update={"input": Path(tmp) / "in", "output": Path(tmp) / "out",
                                     "private": None, "poison": settings,
                                     "force": False})  # fmt: skip
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
                result = protect(run, hooks=RunHooks(on_round, False))
        except ConfigError as err:  # named without the temporary folder
            raise ConfigError(str(err).replace(f"{tmp}/", "")) from None
    after = zip(marks, marks[1:], rounds[1:], strict=False)
    gaps = [b - a - r["round_seconds"] for a, b, r in after]
    per_round = max(0.0, sum(gaps) / len(gaps)) if gaps else 0.0
    spent = sum(r["round_seconds"] for r in rounds) + per_round * len(rounds)
    return Probed(sum(result.stage_seconds.values()) - spent, rounds, per_round)


def _mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else 0.0


def step_times(probe: PoisonConfig, rounds: list[dict[str, float]], k: int) -> dict[str, float]:
    """Seconds per image of each step of a round, from the probe's plain rounds (not the
    first: it also pays the new model's first passes) and the first round's trigger update."""
    plain = rounds[1:] or rounds
    noise = f"{NOISE_STEP.get(probe.method, 'pgd')}_seconds"
    steps = ("surrogate_seconds", noise, "trigger_seconds")
    rest = [r["round_seconds"] - sum(r.get(key, 0.0) for key in steps) for r in plain]
    surrogate = probe.surrogate_steps * min(probe.batch_size, k)
    return {
        "per_surrogate_pass": _mean(plain, "surrogate_seconds") / max(1, surrogate),
        "per_noise_pass": _mean(plain, noise) / max(1, noise_passes(probe, k)),
        "per_round_image": max(0.0, sum(rest) / len(rest)) / k if rest else 0.0,
        "per_trigger_image": rounds[0].get("trigger_seconds", 0.0) / k if rounds else 0.0,
    }


def run_probe(
    cfg: ProtectConfig, items: list[tuple[str, bytes, list[str]]], n: int | None = None
) -> Timings:
    """Time the probe on ``items`` (``(extension, bytes, captions)`` of good photos): a run of
    :data:`SMALL` photos and one of ``k`` (two points: what each image adds, what is paid once)
    with the shortened schedule (module doc); ``n``: the run's photos (default: the items).

    It runs in a fresh interpreter (``python -m mme.app.probe``), as ``mme protect`` does: the
    caller's process may hold what a run does not (imports, threads, torch settings of earlier
    work). In a pytest process after 690 tests the probe's per-photo cost came out 0.044 s
    against 0.02 to 0.03 s in a fresh one, and the 40-photo estimate of tests/test_protect.py
    1.2 to 1.4 times the run (the last two CI runs)."""
    import mme

    with tempfile.TemporaryDirectory(prefix="mme-probe-") as tmp:
        folder = Path(tmp)
        for i, (_, data, _) in enumerate(items):
            (folder / f"{i:03d}.bin").write_bytes(data)
        request = {"cfg": cfg.model_dump(mode="json"), "n": n,
                   "items": [{"ext": ext, "captions": caps} for ext, _, caps in items]}  # fmt: skip
        fsio.write_json(folder / "request.json", request)
        here = [str(Path(mme.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        path = os.pathsep.join(p for p in here if p)  # this mme, wherever it was imported from
        argv = [sys.executable, "-m", "mme.app.probe", tmp]
        done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                              text=True, errors="replace")  # fmt: skip
        result = folder / "timings.json"
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"the time probe failed (exit {done.returncode}): {done.stderr[-2000:]}"
            )
        answer = json.loads(result.read_text())
    if "error" in answer:  # the run would stop the same way (plan reports it)
        raise ConfigError(answer["error"])
    return Timings.model_validate(answer["timings"])


def main(argv: list[str]) -> int:
    """``python -m mme.app.probe FOLDER``: :func:`run_probe`'s request in FOLDER, timed here;
    the answer in ``FOLDER/timings.json``."""
    folder = Path(argv[0])
    request = json.loads((folder / "request.json").read_text())
    items = [(it["ext"], (folder / f"{i:03d}.bin").read_bytes(), it["captions"])
             for i, it in enumerate(request["items"])]  # fmt: skip
    cfg = ProtectConfig.model_validate(request["cfg"])
    env.prepare_process_env(poison_config(cfg).cpu_isa)  # an entry point: before torch loads
    try:
        timings = _probe_here(cfg, items, request["n"])
        answer: dict[str, Any] = {"timings": timings.model_dump()}
    except ConfigError as err:
        answer = {"error": str(err)}
    fsio.write_json(folder / "timings.json", answer)
    return 0


def _probe_here(
    cfg: ProtectConfig, items: list[tuple[str, bytes, list[str]]], n: int | None
) -> Timings:
    """:func:`run_probe` in this process."""
    pcfg = poison_config(cfg)
    _, (guess,) = one_pass(pcfg)
    k, overrides = schedule(pcfg, min(len(items), MAX_IMAGES), guess)
    base = pcfg.model_dump(exclude={*FIXED, "work"})
    t0 = time.perf_counter()
    a = None  # with too few photos apart, everything outside the rounds counts per image
    if k >= 3 * SMALL:  # two rounds: the first one's extra time is the model's warm-up
        a = _timed_run(cfg, items[:SMALL], base | overrides | {"rounds": 2})
    b = _timed_run(cfg, items[:k], base | overrides)
    per_image = max(0.0, (b.rest - a.rest) / (k - SMALL) if a else b.rest / k)
    setup = 0.0
    if a is not None:
        first, second = (a.rounds + [{}, {}])[:2]
        warm_up = first.get("round_seconds", 0.0) - second.get("round_seconds", 0.0)
        warm_up -= first.get("trigger_seconds", 0.0)  # the trigger update is priced apart
        setup = max(0.0, a.rest - SMALL * per_image) + max(0.0, warm_up)
    probe = pcfg.model_copy(update=overrides)
    steps = step_times(probe, b.rounds, k)
    factor = batch_factor(pcfg, k, n or len(items))  # both steps run in batches of min(B, n)
    steps["per_surrogate_pass"] *= factor
    steps["per_noise_pass"] *= factor
    return Timings(images=k, setup=setup, per_image=per_image, per_round=b.per_round,
                   probe_seconds=time.perf_counter() - t0, **steps)  # fmt: skip


def summary(t: Timings) -> dict[str, Any]:
    """The probe's figures for the plan's text."""
    return {"k": t.images, "probe_s": t.probe_seconds, "per_image_s": t.per_image,
            "surrogate_ms": 1000 * t.per_surrogate_pass,
            "noise_ms": 1000 * t.per_noise_pass}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
