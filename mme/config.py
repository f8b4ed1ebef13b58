"""Typed configuration: one pydantic model per ``params.yaml`` section.

Every model forbids unknown keys, so a typo in ``params.yaml`` or a CLI override fails before any
work starts, with a message naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A bad configuration value; the message is meant for the user as is."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """``data:`` section — the ``prepare`` stage."""

    source: Literal["synthetic", "csv", "folder", "webdataset"] = "synthetic"
    out: Path = Path("data/shards/synthetic")
    seed: int = 0
    # synthetic generator
    n_train: int = Field(2000, ge=1)
    n_test: int = Field(500, ge=1)
    image_size: int = Field(64, ge=16, le=1024)
    captions_per_image: int = Field(5, ge=1, le=20)
    # csv source (the MEM paper's split files); train_csv/test_csv give a source split
    csv: Path | None = None
    train_csv: Path | None = None
    test_csv: Path | None = None
    image_column: str = "images"
    caption_column: str = "caption"
    delimiter: str = ","
    image_root: Path | None = None
    # folder / webdataset sources
    input: Path | None = None
    # split when the source has none: fraction of images (by a hash of the id) that go to test
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # image hygiene
    max_side: int | None = Field(None, ge=16, description="resize so the short side <= this")
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)  # PIL's own decompression-bomb limit
    strict: bool = False
    shard_size: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _source_inputs(self) -> DataConfig:
        need = {"csv": ("csv", "train_csv"), "folder": ("input",), "webdataset": ("input",)}
        keys = need.get(self.source, ())
        if keys and all(getattr(self, k) is None for k in keys):
            raise ValueError(f"source={self.source!r} needs one of: {', '.join(keys)}")
        return self


# Victim training profiles. ``fast``: the embedded synthetic default, a tiny model trained from
# scratch on CPU in minutes. ``paper``: the MEM paper's clean-CLIP training (its released code:
# RN50 from scratch, 32 epochs, batch 128, AdamW lr 5e-4, wd 0.2, cosine with 10k warm-up steps).
VICTIM_PROFILES: dict[str, dict[str, Any]] = {
    "fast": {
        "model": "mme-tiny-vit",
        "epochs": 4,
        "batch_size": 128,
        "lr": 1e-3,
        "wd": 0.1,
        "warmup": 50,
    },
    "paper": {
        "model": "RN50",
        "epochs": 32,
        "batch_size": 128,
        "lr": 5e-4,
        "wd": 0.2,
        "warmup": 10000,
    },
}


class PoisonConfig(Section):
    """``poison:`` section — MEM and the baselines (paper values in comments)."""

    method: Literal["mem", "em", "errmax", "random"] = "mem"
    clean: Path = Field(Path("data/shards/synthetic"), description="clean shards from prepare")
    out: Path = Field(Path("data/protected/mem"), description="protected set folder")
    model: str = Field("mme-tiny-vit", description="surrogate open_clip config (paper: RN50)")
    pretrained: Path | None = Field(None, description="local surrogate checkpoint")
    epsilon: float = Field(8.0, gt=0, le=255, description="L-inf budget, pixel units (paper: 8)")
    step_size: float = Field(1.0, gt=0, le=255, description="PGD step, pixel units (paper: 1)")
    pgd_steps: int = Field(8, ge=1, description="PGD steps per noise update (paper: 8)")
    rounds: int = Field(20, ge=1, description="outer rounds T (paper: 20)")
    surrogate_steps: int = Field(200, ge=0, description="surrogate steps per round M (paper: 200)")
    surrogate_lr: float = Field(1e-4, gt=0, description="surrogate AdamW lr (paper: 1e-4)")
    surrogate_wd: float = Field(0.1, ge=0)
    batch_size: int = Field(128, ge=2, description="pairs per batch (paper: 128)")
    trigger_len: int = Field(3, ge=1, le=16, description="trigger tokens k (paper: 3 or 5)")
    trigger_rounds: int = Field(5, ge=0, description="rounds with trigger updates H (paper: 5)")
    candidates: int = Field(16, ge=1, description="HotFlip candidates per position (paper: 16)")
    shuffle_captions: bool = Field(True, description="shuffle caption bodies during PGD (MEM)")
    augment: bool = Field(True, description="EOT over the victim's random-resized-crop")
    protect_fraction: float = Field(1.0, gt=0, le=1, description="share of images protected")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="torch.compile the image tower")
    threads: int = Field(
        1,
        ge=1,
        description="torch CPU threads of the loop; part of the result (same count: same bytes)",
    )
    grid_samples: int = Field(6, ge=1, le=64)
    shard_size: int = Field(1000, ge=1)


class VictimConfig(Section):
    """``victim:`` section — victim CLIP training with open_clip_train (``mme train``).

    ``profile`` fills every training hyper-parameter that is not given explicitly (in params.yaml
    or on the command line) from :data:`VICTIM_PROFILES`; the defaults below are ``fast``'s.
    """

    profile: Literal["fast", "paper"] = Field(
        "fast", description="defaults for the rest: fast|paper"
    )
    model: str = Field(VICTIM_PROFILES["fast"]["model"], description="open_clip model config name")
    epochs: int = Field(VICTIM_PROFILES["fast"]["epochs"], ge=1)
    batch_size: int = Field(VICTIM_PROFILES["fast"]["batch_size"], ge=2)
    lr: float = Field(VICTIM_PROFILES["fast"]["lr"], gt=0)
    wd: float = Field(VICTIM_PROFILES["fast"]["wd"], ge=0)
    warmup: int = Field(VICTIM_PROFILES["fast"]["warmup"], ge=0, description="warm-up steps")
    pretrained: Path | None = Field(None, description="local checkpoint to start from")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "amp_bf16", "amp"] = Field(
        "auto", description="auto: amp_bf16 on CUDA, fp32 on CPU"
    )
    seed: int = 0
    workers: int = Field(1, ge=0, description="data loader worker processes")
    threads: int = Field(
        0, ge=0, description="torch CPU threads (0: torch default); 1 when jobs share the CPU"
    )
    keep_pairs: bool = Field(False, description="keep the expanded one-caption-per-sample shards")

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        profile = data.get("profile") or "fast"
        defaults = VICTIM_PROFILES.get(profile, {})  # an unknown profile fails on its own field
        return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}


class EvaluateConfig(Section):
    """``evaluate:`` section — image<->text retrieval on a clean test split (``mme evaluate``)."""

    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrackingConfig(Section):
    """``tracking:`` section — where the orchestrators (DVC, Prefect) log: one experiment per
    dataset. The stage modules themselves read ``$MLFLOW_EXPERIMENT_NAME``; ``dvc.yaml`` and the
    flows set it from here."""

    experiment: str = Field("mme", min_length=1, description="MLflow experiment (the dataset)")


class ReportConfig(Section):
    """``report:`` section — ``mme report``: the comparison table of evaluated victims."""

    experiment: str | None = Field(None, description="MLflow experiment (None: all)")
    datasets: list[Path] = Field(
        default_factory=list,
        description="keep only runs trained on the current version of these folders ([]: all)",
    )
    out: Path | None = Field(None, description="also write the Markdown table here")


class ReevaluateConfig(Section):
    """``reevaluate:`` section — the ``reevaluate`` flow: check a published protected set against
    a list of victims. Each ``victims`` entry overrides keys of the ``victim:`` section (``{}`` is
    the pipeline's own victim), so adding an architecture is one line (``- model: RN50``)."""

    protected: Path = Field(Path("data/protected/mem"), description="protected set folder")
    rev: str | None = Field(None, description="git/DVC revision of `protected` (None: workspace)")
    clean: Path = Field(
        Path("data/shards/synthetic"), description="clean shards with the test split"
    )
    runs: Path = Field(Path("runs/reevaluate"), description="victim run folders go here")
    cron: str = Field("0 3 * * *", description="schedule of the `reevaluate/scheduled` deployment")
    victims: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1)


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "poison": PoisonConfig,
    "victim": VictimConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
    "report": ReportConfig,
    "reevaluate": ReevaluateConfig,
}


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
    return "invalid configuration:\n  " + "\n  ".join(lines)


def read_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def load_section(
    section: str, params_path: Path | None = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
):
    """The ``section`` model from ``params.yaml`` plus CLI ``overrides`` (None values ignored)."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} (allowed: {', '.join(SECTIONS)})")
    values = dict(read_params(params_path).get(section) or {}) if params_path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return SECTIONS[section](**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(section, err)) from None


def reevaluation_victims(params_path: Path | None = DEFAULT_PARAMS) -> list[VictimConfig]:
    """The ``reevaluate.victims`` of ``params_path``, each merged over its ``victim:`` section."""
    raw = read_params(params_path) if params_path else {}
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


def add_section_arguments(parser: Any, section: str, skip: tuple[str, ...] = ()) -> None:
    """Add ``--params`` and one ``--field-name`` flag per field of ``section``'s model.

    Values are parsed by pydantic (not argparse) so a bad flag fails with the same message as a
    bad ``params.yaml`` value. Booleans get ``--flag/--no-flag``.
    """
    import argparse

    if not any(a.dest == "params" for a in parser._actions):
        parser.add_argument(
            "--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)"
        )
    group = parser.add_argument_group(f"{section} settings (override params.yaml)")
    for name, field in SECTIONS[section].model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or f"default: {field.default!r}"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=name, default=None, metavar="V", help=help_text)


def section_from_args(section: str, args: Any):
    """The ``section`` model from ``args.params`` with every given flag of that section applied."""
    names = SECTIONS[section].model_fields
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return load_section(section, args.params, overrides)
