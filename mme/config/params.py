"""Reading ``params.yaml``: its sections as typed models, with CLI overrides applied.

A missing default ``params.yaml`` (a run outside the repository) or ``--params none`` means the
built-in defaults (:data:`mme.config.profiles.STANDALONE_PARAMS`); a file named explicitly must
exist.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mme import paths
from mme.config.profiles import STANDALONE_PARAMS
from mme.config.schema import SECTIONS, ConfigError, VictimConfig

DEFAULT_PARAMS = paths.PARAMS


def format_validation_error(section: str, err: ValidationError) -> str:
    """One line per problem: ``section.key = value: what is allowed``."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (section, *e["loc"]))
        value = e.get("input")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(SECTIONS[section].model_fields))
            msg = f"unknown key (allowed: {allowed})"
        lines.append(f"{key} = {value!r}: {msg}")
    if len(lines) == 1:  # the common case: one line, as every other user error
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)


NO_PARAMS = "none"  # ``--params none``: no file, the built-in defaults


def read_params(path: Path | None = DEFAULT_PARAMS) -> dict[str, Any]:
    """The sections of ``path``; the built-in :data:`STANDALONE_PARAMS` when there is no file.

    ``None`` or a missing *default* ``params.yaml`` (a run outside the repo) means no file; a
    missing file that was named explicitly is an error, never silently read as empty.
    """
    if path is None or str(path) == NO_PARAMS:
        return STANDALONE_PARAMS
    path = Path(path)
    if not path.exists():
        if path == DEFAULT_PARAMS:
            _note_standalone()
            return STANDALONE_PARAMS
        raise ConfigError(
            f"params file {path} not found: fix the path, or pass --params {NO_PARAMS} "
            "for the built-in defaults"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def default_shards(params: Path | None) -> Path:
    """The clean shards a command works on by default: ``data.out`` of ``params``, else
    :data:`mme.paths.CLEAN`."""
    data = (read_params(params).get("data") or {}) if params else {}
    return Path(data.get("out") or paths.CLEAN)


_noted: list[bool] = []


def _note_standalone() -> None:
    """Say once per process that the built-in defaults are in use (not silently)."""
    if not _noted:
        _noted.append(True)
        print(
            f"mme: no {DEFAULT_PARAMS} here: using the built-in defaults "
            "(poison: the photo profile, mme.config.PHOTO_PROFILE)",
            file=sys.stderr,
        )


def load_section(
    section: str, params_path: Path | None = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
):
    """The ``section`` model from ``params.yaml`` plus CLI ``overrides`` (None values ignored)."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} (allowed: {', '.join(SECTIONS)})")
    values = dict(read_params(params_path).get(section) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return SECTIONS[section](**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(section, err)) from None


def reevaluation_victims(params_path: Path | None = DEFAULT_PARAMS) -> list[VictimConfig]:
    """The ``reevaluate.victims`` of ``params_path``, each merged over its ``victim:`` section."""
    raw = read_params(params_path)
    base = dict(raw.get("victim") or {})
    entries = load_section("reevaluate", params_path).victims
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(VictimConfig(**{**base, **entry}))
        except ValidationError as err:
            raise ConfigError(
                format_validation_error("victim", err).replace(
                    "victim.", f"reevaluate.victims[{i}]."
                )
            ) from None
    return out


def params_file(value: str) -> Path | None:
    """argparse type of ``--params``: a path, or ``none`` for no file (built-in defaults)."""
    return None if value == NO_PARAMS else Path(value)
