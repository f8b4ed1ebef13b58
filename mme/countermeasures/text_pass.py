"""The whole-split text pass of ``mme attack``: what ``detect-trigger``, ``detect-ngram`` and
``oracle-strip`` need around the per-sample loop, and the private score.

Per run, before any output is written: the spec's ``K`` from the public manifest, oracle-strip's
private table (``attack.private``) and the score's (``attack.score_private``). Per split: the
detector fitted on the protected split's captions (first pass; the detectors are handed captions
and ``K`` only, never a private table). Per sample: the caption windows to drop, and the score.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mme import fsio, shards
from mme.config import AttackConfig, ConfigError
from mme.countermeasures import detect, oracle, score, transforms

# private paths and measuring flags: no part of what the data depends on, never published
NOT_RECORDED = ("private", "score_private", "score_out")
Windows = list[detect.Window | None]


def resolve(spec: transforms.AttackSpec, manifest: dict[str, Any]) -> transforms.AttackSpec:
    """``detect-*`` without ``:K`` -> with the public manifest's ``trigger_len`` (else 3)."""
    if spec.name in transforms.K_FROM_MANIFEST and spec.arg is None:
        return transforms.AttackSpec(spec.name, detect.public_k(manifest))
    return spec


class TextPass:
    """The private tables of one run, the fitted detector of the current split, the score."""

    def __init__(self, cfg: AttackConfig, spec: transforms.AttackSpec, out: Path) -> None:
        check_score_out(cfg, out)
        load = oracle.TriggerTable.load
        self.cfg, self.spec = cfg, spec
        self.oracle = load(cfg.private) if spec.name == "oracle-strip" else None
        self.truth = load(cfg.score_private) if cfg.score_private is not None else None
        self.score = score.Score()
        self.detector: detect.TriggerDetector | detect.NgramDetector | None = None

    def fit(self, split: str) -> None:
        """The first passes over ``split`` (captions only) when the spec is a detector."""
        if self.spec.name in detect.DETECTORS:

            def images() -> Iterable[list[str]]:
                return (s.captions for s in shards.iter_samples(self.cfg.protected, split))

            self.detector = detect.detector(self.spec.name, int(self.spec.arg), images)

    def windows(self, sample: shards.Sample) -> Windows | None:
        """What to drop from the sample's captions; None: the spec is no whole-split one."""
        if self.detector is not None:
            return self.detector.windows(sample.captions)
        if self.oracle is not None:
            return self.oracle.windows(sample.id, sample.captions)
        return None

    def record(self, sample: shards.Sample, removed: Windows | None, attacked: list[str]) -> None:
        """Score one sample (only with ``score_private``)."""
        if self.truth is None:
            return
        cut = removed if removed is not None else score.removed_by(self.spec, sample.captions)
        self.score.add(self.truth, sample.id, sample.captions, cut, attacked)

    def finish(self) -> None:
        """Print the score and write ``score_out``: a measurement, not part of the data."""
        if self.truth is None:
            return
        summary = self.score.summary()
        print(score.line(str(self.spec), summary), file=sys.stderr)
        if self.cfg.score_out is not None:
            record = {"attack": str(self.spec), "protected": str(self.cfg.protected)}
            record["private"] = str(self.cfg.score_private)
            fsio.write_json(self.cfg.score_out, record | summary)


def check_score_out(cfg: AttackConfig, out: Path) -> None:
    """A private-derived score file lands in no input or data folder."""
    if cfg.score_out is None:
        return
    dest = Path(cfg.score_out).resolve()
    for d in (cfg.protected, out, cfg.private, cfg.score_private):
        if d is not None and dest.is_relative_to(Path(d).resolve()):
            raise ConfigError(f"attack.score_out = {str(cfg.score_out)!r} is inside {d}")
