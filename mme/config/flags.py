"""Command-line flags generated from the config models: one ``--field-name`` per field.

Values are parsed by pydantic, not argparse, so a bad flag fails with the same message as a bad
``params.yaml`` value; ``--help`` shows each field's description and the default a run here would
start from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from mme.config.params import DEFAULT_PARAMS, NO_PARAMS, load_section, params_file
from mme.config.profiles import STANDALONE_PARAMS
from mme.config.schema import SECTIONS


def add_params_argument(parser: Any, what: str = "settings") -> None:
    """``--params FILE`` (once per parser)."""
    if not any(a.dest == "params" for a in parser._actions):
        parser.add_argument(
            "--params",
            type=params_file,
            default=DEFAULT_PARAMS,
            metavar="FILE",
            help=f"params file with the {what} (default: {DEFAULT_PARAMS}; when it is absent, "
            f"or with '{NO_PARAMS}': the built-in defaults)",
        )


def show_default(value: Any) -> str:
    """A default as a user would type it: ``data/x`` not ``PosixPath('data/x')``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def _metavar(annotation: Any) -> tuple[str | None, list[str] | None]:
    """``(metavar, choices)`` for a field type: Literal -> its choices, else a type word."""
    from typing import get_args, get_origin

    if get_origin(annotation) is Literal:
        return None, [str(a) for a in get_args(annotation)]
    types = set(get_args(annotation)) or {annotation}
    for kind, word in ((Path, "PATH"), (float, "X"), (int, "N")):
        if kind in types:
            return word, None
    return "TEXT", None


def _help_defaults(section: str) -> tuple[dict[str, Any], str]:
    """The values a run here would start from, for ``--help``: ./params.yaml's section if there
    is one, else the built-in defaults (a broken file is left to the run to report)."""
    if not DEFAULT_PARAMS.exists():
        return STANDALONE_PARAMS.get(section, {}), f"built-in (no {DEFAULT_PARAMS} here)"
    try:
        raw = yaml.safe_load(DEFAULT_PARAMS.read_text()) or {}
        return dict(raw.get(section) or {}), f"./{DEFAULT_PARAMS}, else built-in"
    except (yaml.YAMLError, AttributeError, OSError):
        return {}, "built-in"


def add_section_arguments(
    parser: Any,
    section: str,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    origin: str = "built-in",
) -> None:
    """Add ``--params`` and one ``--field-name`` flag per field of ``section``'s model
    (:func:`add_model_arguments`); ``defaults`` replace the model's in ``--help``, where the
    group says they come from ``origin``."""
    add_params_argument(parser, f"{section}: section")
    shown, origin = _help_defaults(section) if defaults is None else (defaults, origin)
    group = parser.add_argument_group(
        f"{section} settings", f"defaults shown: {origin}; a flag replaces its value"
    )
    add_model_arguments(group, SECTIONS[section], shown, skip)


def add_model_arguments(
    group: Any,
    model: type[BaseModel],
    shown: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
    lists: dict[str, str] | None = None,
) -> None:
    """One ``--field-name`` flag per field of ``model``, every value left to pydantic.

    Values are parsed by pydantic (not argparse) so a bad flag fails with the same message as a
    bad ``params.yaml`` value. Booleans get ``--flag/--no-flag``; a Literal field lists its
    choices; every flag shows its description and default (``shown`` replaces the model's).
    ``lists`` names the fields given as several words (``nargs="+"``) with their metavar; other
    list fields take one comma-separated word (the model splits it).
    """
    shown, lists = shown or {}, lists or {}
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default_factory is None else field.default_factory()
        default = shown.get(name, default)
        if name in lists:
            default = " ".join(default) if isinstance(default, list) else default
        description = field.description or name.replace("_", " ")
        help_text = f"{description} (default: {show_default(default)})".replace("%", "%%")
        if field.annotation is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        metavar, choices = _metavar(field.annotation)
        if choices:  # shown, but checked by pydantic: the same message as in params.yaml
            metavar = "{" + ",".join(choices) + "}"
        kwargs = {"nargs": "+", "metavar": lists[name]} if name in lists else {"metavar": metavar}
        group.add_argument(flag, dest=name, default=None, help=help_text, **kwargs)


def section_from_args(section: str, args: Any):
    """The ``section`` model from ``args.params`` with every given flag of that section applied."""
    names = SECTIONS[section].model_fields
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return load_section(section, args.params, overrides)
