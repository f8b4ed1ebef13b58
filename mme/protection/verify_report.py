"""The outcome of ``mme verify``: per-check violations, the quality summaries, the verdict,
as JSON (``--json``, ``verify.json``) and as the table ``mme verify`` prints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("missing", "extra", "duplicate", "image", "linf", "noise", "trigger", "caption", "meta")


# what only the private folder can tell (the public set names no trigger and no protected flag)
NEEDS_PRIVATE = (
    "that each trigger is the one triggers.json records, at its recorded word",
    "that unprotected images (protect_fraction < 1) equal their clean one: all held to eps",
    "that clip(clean + noise.npy) is exactly the protected image",
)


SHOW_IDS = 20  # offending ids listed per check in the table; the JSON report has all of them


SHOW_DETAILS = 5  # example messages kept per check


@dataclass
class Summary:
    """Running min / mean / max of one per-image quantity (``inf`` values included)."""

    n: int = 0
    min: float = math.inf
    max: float = -math.inf
    total: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.min, self.max = min(self.min, value), max(self.max, value)
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0, "min": None, "mean": None, "max": None}
        return {"n": self.n, "min": _num(self.min), "mean": _num(self.mean), "max": _num(self.max)}


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``ok`` iff there is no violation and no set-level error."""

    clean: str
    protected: str
    method: str
    model: str
    epsilon: float
    working_size: int
    n_clean: int = 0
    n_protected: int = 0
    n_checked: int = 0
    n_with_noise: int = 0  # protected pairs (triggers.json; without it: pairs that differ)
    max_linf: int = 0
    noise_checked: bool = False
    private_checked: bool = False  # triggers.json read: triggers and protected flags checked
    psnr: Summary = field(default_factory=Summary)
    ssim: Summary = field(default_factory=Summary)
    violations: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    details: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: list[str] = field(default_factory=list)  # set-level problems (counts, noise.npy)

    def add(self, sample_id: str, kind: str, detail: str) -> None:
        """Record one violation (an id is listed once per kind)."""
        ids = self.violations[kind]
        if not ids or ids[-1] != sample_id:
            ids.append(sample_id)
        if len(self.details[kind]) < SHOW_DETAILS:
            self.details[kind].append(f"{sample_id}: {detail}")

    @property
    def offending_ids(self) -> list[str]:
        """Ids with any violation, each once: by check (``KINDS`` order), then as seen."""
        return list(dict.fromkeys(i for k in KINDS for i in self.violations[k]))

    @property
    def ok(self) -> bool:
        return not self.errors and not self.offending_ids

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (strict JSON: an infinite PSNR is written as the string ``"inf"``)."""
        out = asdict(self)
        out["psnr"], out["ssim"] = self.psnr.to_dict(), self.ssim.to_dict()
        out.update(ok=self.ok, offending_ids=self.offending_ids)
        return out

    def table(self) -> str:
        """Human summary: settings, counts, image quality, one line per check, the verdict."""
        status = "OK" if self.ok else "FAILED"
        lines = [
            f"mme verify: {self.protected}  vs  clean {self.clean}",
            f"  method {self.method}   eps {self.epsilon:g}/255 (L-inf, pixels)   "
            f"size {self.working_size}   tokenizer {self.model}",
            f"  images   clean {self.n_clean}   protected {self.n_protected}   "
            f"checked {self.n_checked}   with noise {self.n_with_noise}",
            f"  L-inf    max {self.max_linf} (bound {self.epsilon:g})",
            _summary_line("PSNR dB", self.psnr, ".2f"),
            _summary_line("SSIM", self.ssim, ".4f"),
            f"  {'check':<10}{'violations':>10}  ids",
        ]
        for kind in KINDS:
            if kind == "noise" and not self.noise_checked:
                lines.append(f"  {kind:<10}{'-':>10}  (no private folder: --private DIR)")
                continue
            if kind == "trigger" and not self.private_checked:
                lines.append(f"  {'':14}(no private folder: trigger read off the captions)")
            ids = self.violations[kind]
            lines.append(f"  {kind:<10}{len(ids):>10}  {list_ids(ids)}".rstrip())
            lines += [f"{'':14}e.g. {d}" for d in self.details[kind][:2]]
        if not self.private_checked:
            lines += [f"  not checked (needs --private): {n}" for n in NEEDS_PRIVATE]
        lines += [f"  error: {e}" for e in self.errors]
        n_bad = len(self.offending_ids)
        lines.append(f"  result: {status}" + (f" ({n_bad} offending ids)" if n_bad else ""))
        return "\n".join(lines)


def list_ids(ids: list[str], limit: int = SHOW_IDS) -> str:
    """``"a, b, c"``, or the first ``limit`` ids and ``" (+N more)"``."""
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _summary_line(name: str, s: Summary, fmt: str) -> str:
    if not s.n:
        return f"  {name:<8} (no protected images)"
    return f"  {name:<8} min {s.min:{fmt}}   mean {s.mean:{fmt}}   max {s.max:{fmt}}   (n={s.n})"
