"""The grammar of countermeasure specs (``mme attack --transform``, ``attack.transform``).

A spec is ``NAME`` or ``NAME:ARG``; :func:`parse_spec` checks the name and the argument's kind
and range. Core-level so the ``attack:`` section validates a spec without importing the
transforms (what each one does: :mod:`mme.countermeasures.transforms`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# name -> (argument kind, default argument, lower bound, upper bound); kind None: no argument
SPECS: dict[str, tuple[type | None, float | None, float | None, float | None]] = {
    "jpeg": (int, None, 1, 100),
    "resize": (int, None, 8, 8192),
    "img2dataset": (None, None, None, None),
    "blur": (float, None, 0.01, 64.0),
    "grayscale": (None, None, None, None),
    "iss": (int, 10, 1, 100),
    "strip-trigger": (int, 3, 1, 64),
    "shuffle-words": (None, None, None, None),
    "detect-trigger": (int, None, 1, 16),
    "detect-ngram": (int, None, 1, 16),
    "oracle-strip": (None, None, None, None),
}
# K is optional without a fixed default: the protected set's public trigger_len (mme attack)
K_FROM_MANIFEST = ("detect-trigger", "detect-ngram")
WHOLE_SPLIT = (*K_FROM_MANIFEST, "oracle-strip")  # need corpus statistics or the private files
TEXT_ATTACKS = ("strip-trigger", "shuffle-words", *WHOLE_SPLIT)
SPEC_RE = re.compile(r"^([a-z0-9-]+)(?::([0-9]+(?:\.[0-9]+)?))?$")


@dataclass(frozen=True)
class AttackSpec:
    """A parsed attack: ``name`` and its argument (``None`` for attacks without one)."""

    name: str
    arg: float | None = None

    def __str__(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}:{self.arg:g}"

    @property
    def on_text(self) -> bool:
        return self.name in TEXT_ATTACKS


def parse_spec(spec: str) -> AttackSpec:
    """``"jpeg:90"`` -> ``AttackSpec("jpeg", 90)``; a ValueError names what is allowed."""
    allowed = "allowed: " + ", ".join(_usage(n) for n in SPECS)
    m = SPEC_RE.match(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None or m.group(1) not in SPECS:
        raise ValueError(f"unknown attack {spec!r} ({allowed})")
    name, raw = m.group(1), m.group(2)
    kind, default, lo, hi = SPECS[name]
    if kind is None:
        if raw is not None:
            raise ValueError(f"attack {name!r} takes no argument (got {raw!r})")
        return AttackSpec(name)
    if raw is None:
        if name in K_FROM_MANIFEST:
            return AttackSpec(name)
        if default is None:
            raise ValueError(f"attack {name!r} needs an argument: {_usage(name)}")
        return AttackSpec(name, kind(default))
    if kind is int and "." in raw:
        raise ValueError(f"attack {name!r}: argument must be a whole number (got {raw!r})")
    value = kind(raw)
    if not lo <= value <= hi:
        raise ValueError(f"attack {name!r}: argument {raw} outside [{lo:g}, {hi:g}]")
    return AttackSpec(name, value)


def _usage(name: str) -> str:
    kind, default, _, _ = SPECS[name]
    if kind is None:
        return name
    arg = "Q" if name in ("jpeg", "iss") else {"resize": "S", "blur": "SIGMA"}.get(name, "K")
    optional = default is not None or name in K_FROM_MANIFEST
    return f"{name}[:{arg}]" if optional else f"{name}:{arg}"


def slug(spec: str | AttackSpec) -> str:
    """A file-name-safe label: ``jpeg:90`` -> ``jpeg90``, ``blur:1.5`` -> ``blur1.5``."""
    return str(spec if isinstance(spec, AttackSpec) else parse_spec(spec)).replace(":", "")
