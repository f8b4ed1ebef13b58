"""Typed configuration: one pydantic model per ``params.yaml`` section.

Every model forbids unknown keys, so a typo in ``params.yaml`` or a CLI override fails before any
work starts, with a message naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mme import paths
from mme.config.keyed import KeyedSettings
from mme.config.profiles import VICTIM_PROFILES
from mme.config.specs import parse_spec


class ConfigError(ValueError):
    """A bad configuration value; the message is meant for the user as is."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """``data:`` section — the ``prepare`` stage."""

    source: Literal["synthetic", "csv", "folder", "webdataset", "hf"] = Field(
        "synthetic", description="where the images and captions come from"
    )
    out: Path = Field(paths.CLEAN, description="shard folder to write")
    seed: int = Field(0, description="seed of the synthetic generator")
    # synthetic generator
    n_train: int = Field(2000, ge=1, description="synthetic: train images")
    n_test: int = Field(500, ge=1, description="synthetic: test images")
    image_size: int = Field(64, ge=16, le=1024, description="synthetic: image side in px")
    captions_per_image: int = Field(5, ge=1, le=20, description="synthetic: captions per image")
    # csv source (the MEM paper's split files); train_csv/test_csv give a source split
    csv: Path | None = Field(None, description="csv: one CSV, one row per caption")
    train_csv: Path | None = Field(None, description="csv: the source's own train CSV")
    test_csv: Path | None = Field(None, description="csv: the source's own test CSV")
    image_column: str = Field(
        "images", description="csv: column with the image path (hf: image column, else 'image')"
    )
    caption_column: str = Field(
        "caption", description="csv/hf: column with the caption(s) (hf: else 'text', ...)"
    )
    delimiter: str = Field(",", description="csv: field delimiter")
    image_root: Path | None = Field(None, description="csv: folder the image paths are under")
    allow_absolute_paths: bool = Field(
        False, description="csv: read absolute image paths outside image_root as they are"
    )
    # folder / webdataset sources
    input: Path | None = Field(
        None, description="folder/webdataset: the input folder; hf: save_to_disk folder/parquet"
    )
    # split when the source has none: fraction of images (by a hash of the id) that go to test
    test_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of images for the test split (by id hash)"
    )
    # image hygiene
    max_side: int | None = Field(None, ge=16, description="resize so the short side <= this")
    min_side: int = Field(16, ge=1, description="skip images with a shorter short side (px)")
    max_pixels: int = Field(  # PIL's own decompression-bomb limit
        89_478_485, ge=1, description="skip larger images (decompression bombs)"
    )
    strict: bool = Field(False, description="exit 1 if any input item was skipped")
    shard_size: int = Field(1000, ge=1, description="samples per tar shard")

    @model_validator(mode="after")
    def _source_inputs(self) -> DataConfig:
        need = {
            "csv": ("csv", "train_csv"),
            "folder": ("input",),
            "webdataset": ("input",),
            "hf": ("input",),
        }
        keys = need.get(self.source, ())
        if keys and all(getattr(self, k) is None for k in keys):
            raise ValueError(f"source={self.source!r} needs one of: {', '.join(keys)}")
        return self


class PoisonConfig(Section, KeyedSettings):
    """``poison:`` section — MEM and the baselines (paper values in comments)."""

    method: Literal["mem", "em", "errmax", "random", "keyed"] = Field(
        "mem",
        description="mem (image noise + text trigger), a baseline, or keyed (noise from "
        "per-word patterns of the captions' key words, captions unchanged)",
    )
    clean: Path = Field(paths.CLEAN, description="clean shards from prepare")
    out: Path = Field(paths.PROTECTED, description="PUBLIC: protected shards + manifest only")
    private: Path | None = Field(
        None,
        description="PRIVATE: noise, triggers, grid, work files (default: data/private/<name"
        " of out>, tied to out)",
    )
    model: str = Field("mme-tiny-vit", description="surrogate open_clip config (paper: RN50)")
    pretrained: Path | None = Field(
        None,
        description="surrogate weights: a checkpoint file, or an open_clip model:tag in "
        "the local Hugging Face cache",
    )
    epsilon: float = Field(8.0, gt=0, le=255, description="L-inf budget, pixel units (paper: 8)")
    step_size: float = Field(1.0, gt=0, le=255, description="PGD step, pixel units (paper: 1)")
    pgd_steps: int = Field(8, ge=1, description="PGD steps per noise update (paper: 8)")
    rounds: int = Field(20, ge=1, description="outer rounds T (paper: 20)")
    surrogate_steps: int = Field(200, ge=0, description="surrogate steps per round M (paper: 200)")
    surrogate_epochs: float | None = Field(
        None, gt=0, description="M as a fraction of an epoch (overrides surrogate_steps)"
    )
    surrogate_lr: float = Field(1e-4, gt=0, description="surrogate AdamW lr (paper: 1e-4)")
    surrogate_wd: float = Field(
        0.2, ge=0, description="AdamW wd on weights, 0 on gains/biases/temperature (paper: 0.2)"
    )
    batch_size: int = Field(128, ge=2, description="pairs per batch (paper: 128)")
    trigger_len: int = Field(3, ge=1, le=16, description="trigger tokens k (paper: 3 or 5)")
    trigger_rounds: int = Field(5, ge=0, description="rounds with trigger updates H (paper: 5)")
    candidates: int = Field(16, ge=1, description="HotFlip candidates per position (paper: 16)")
    trigger_position: Literal["start", "random"] = Field(
        "start",
        description="trigger place in each caption: start (paper) or random (a word boundary "
        "per image, drawn from the seed)",
    )
    trigger_vocab: Literal["any", "words"] = Field(
        "any",
        description="HotFlip tokens: any whole alphabetic word token, or words (3+ letters, "
        "seen in the training captions)",
    )
    shuffle_captions: bool = Field(True, description="shuffle caption bodies during PGD (MEM)")
    augment: bool = Field(True, description="EOT: optimise through the `eot` transformations")
    # EOT choices (mme/protection/methods/augment.py); the defaults are the behaviour before they
    # existed, which combination protects best is not measured yet
    eot: list[Literal["resize", "jpeg", "crop"]] = Field(
        default_factory=lambda: ["crop"],
        description="EOT transformations, comma-separated: resize,jpeg,crop (default crop)",
    )
    eot_interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="EOT resampling (the victim trainer's: bicubic)"
    )
    eot_resize: tuple[float, float] = Field(
        (0.5, 2.0), description="resize EOT: short-side factor range, log-uniform (lo,hi)"
    )
    eot_jpeg_quality: tuple[int, int] = Field(
        (50, 95), description="jpeg EOT: quality range, uniform (lo,hi)"
    )
    protect_fraction: float = Field(1.0, gt=0, le=1, description="share of images protected")
    seed: int = Field(0, description="seed of the surrogate, triggers and subset")
    noise_seed: int | None = Field(
        None,
        ge=0,
        description="random baseline: seed of its noise (default: drawn from the OS; kept in "
        "the private triggers.json only)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available")
    compile: bool = Field(False, description="torch.compile the image tower")
    threads: int = Field(
        1,
        ge=1,
        description="torch CPU threads of the loop; part of the result (same count: same bytes)",
    )
    cpu_isa: Literal["avx2", "native"] = Field(
        "avx2",
        description="CPU kernels of the loop (ATen, oneDNN, MKL) pinned to this level, set "
        "before torch loads; part of the result (native: this machine's own)",
    )
    grid_samples: int = Field(6, ge=1, le=64, description="examples in grid.png")
    shard_size: int = Field(1000, ge=1, description="samples per tar shard")
    write_workers: int = Field(
        0, ge=0, description="processes decoding, encoding + verifying the images (0: one per core)"
    )
    work: Path | None = Field(
        None, description="folder of the memory-mapped work store (default <private>/work)"
    )
    nproc: int = Field(
        1, ge=1, description="processes (GPUs) per node (dvc.yaml: torchrun --nproc_per_node)"
    )

    @field_validator("epsilon", "step_size")
    @classmethod
    def _whole_pixel_levels(cls, value: float) -> float:
        # the noise lives on the 1/255 grid and is stored as integer pixel units: 7.5 would be
        # rounded to 8 in the store and fail verify only after every round
        if not float(value).is_integer():
            raise ValueError("must be a whole number of pixel levels (the noise is stored in them)")
        return value

    @field_validator("eot", "eot_resize", "eot_jpeg_quality", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # a CLI flag arrives as one string: "resize,crop", "0.5,2"
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _private_of_out(self) -> PoisonConfig:
        # the default private folder follows out: a second run with another out never shares
        # (and overwrites) the first one's noise (mme.guard refuses a private folder of another)
        if self.private is None:
            object.__setattr__(self, "private", paths.private_for(self.out))
        return self

    @model_validator(mode="after")
    def _eot_ranges(self) -> PoisonConfig:
        lo, hi = self.eot_resize
        if not 0.05 <= lo <= hi <= 20:
            raise ValueError(f"eot_resize = {(lo, hi)}: need 0.05 <= lo <= hi <= 20")
        lo, hi = self.eot_jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"eot_jpeg_quality = {(lo, hi)}: need 1 <= lo <= hi <= 100")
        return self


class AttackConfig(Section):
    """``attack:`` section — ``mme attack``: a transformed copy of a protected set, what a data
    user might do to it before training (specs: :mod:`mme.config.specs`). The DVC
    pipeline runs one per entry of params.yaml's ``attacks`` (name -> spec)."""

    transform: str = Field(
        "jpeg:90",
        description="jpeg:Q | resize:S | img2dataset | blur:SIGMA | grayscale | iss[:Q] | "
        "strip-trigger[:K] | shuffle-words | detect-trigger[:K] | detect-ngram[:K] | "
        "oracle-strip (needs --private)",
    )
    protected: Path = Field(paths.PROTECTED, description="the set to transform")
    out: Path | None = Field(None, description="output folder (default data/attacked/<name>)")
    seed: int = Field(0, description="seed of shuffle-words")
    shard_size: int = Field(1000, ge=1, description="samples per tar shard")
    # NEEDS THE PRIVATE FILES: read by oracle-strip only; the other transforms never open it
    private: Path | None = Field(
        None, description="oracle-strip only: the poison run's PRIVATE folder (triggers.json)"
    )
    # measuring only, never part of a published pipeline: not recorded in the output manifest
    score_private: Path | None = Field(
        None, description="measuring: score removed words against this PRIVATE triggers.json"
    )
    score_out: Path | None = Field(
        None, description="measuring: write the score as JSON here (needs --score-private)"
    )

    @field_validator("transform")
    @classmethod
    def _known_transform(cls, value: str) -> str:
        return str(parse_spec(value))

    @model_validator(mode="after")
    def _private_inputs(self) -> AttackConfig:
        if self.transform == "oracle-strip" and self.private is None:
            raise ValueError(
                "oracle-strip needs the private files: pass --private DIR (the poison run's "
                "private folder, with triggers.json)"
            )
        if self.score_out is not None and self.score_private is None:
            raise ValueError("score_out needs score_private (the private folder to score against)")
        return self


class VictimConfig(Section):
    """``victim:`` section — victim CLIP training with open_clip_train (``mme train``).

    ``profile`` fills every training hyper-parameter that is not given explicitly (in params.yaml
    or on the command line) from :data:`VICTIM_PROFILES`; the defaults below are ``fast``'s.
    """

    profile: Literal["fast", "paper"] = Field(
        "fast", description="defaults for the rest: fast|paper"
    )
    model: str = Field(VICTIM_PROFILES["fast"]["model"], description="open_clip model config name")
    epochs: int = Field(VICTIM_PROFILES["fast"]["epochs"], ge=1, description="training epochs")
    batch_size: int = Field(VICTIM_PROFILES["fast"]["batch_size"], ge=2, description="batch size")
    lr: float = Field(VICTIM_PROFILES["fast"]["lr"], gt=0, description="AdamW learning rate")
    wd: float = Field(VICTIM_PROFILES["fast"]["wd"], ge=0, description="AdamW weight decay")
    warmup: int = Field(VICTIM_PROFILES["fast"]["warmup"], ge=0, description="warm-up steps")
    pretrained: Path | None = Field(None, description="local checkpoint to start from")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available")
    precision: Literal["auto", "fp32", "amp_bf16", "amp"] = Field(
        "auto", description="auto: amp_bf16 on CUDA, fp32 on CPU"
    )
    seed: int = Field(0, description="seed of initialisation, data order and augmentation")
    workers: int | None = Field(
        None, ge=0, description="data loader processes (None: 1 on CPU, cores - 2 up to 16 on CUDA)"
    )
    view: Literal["images", "pairs"] = Field(
        "images",
        description="images: train on the shards as they are, one random caption per draw; "
        "pairs: write a one-caption-per-sample copy first",
    )
    threads: int = Field(
        0, ge=0, description="torch CPU threads (0: torch default); 1 when jobs share the CPU"
    )
    keep_pairs: bool = Field(False, description="keep the expanded one-caption-per-sample shards")
    nproc: int = Field(
        1, ge=1, description="processes (GPUs) per node (dvc.yaml: torchrun --nproc_per_node)"
    )
    # method keyed's own settings come from KeyedSettings (mme/config/keyed.py)

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

    batch_size: int = Field(256, ge=1, description="images/captions embedded per batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available")


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

    protected: Path = Field(paths.PROTECTED, description="protected set folder")
    rev: str | None = Field(None, description="git/DVC revision of `protected` (None: workspace)")
    clean: Path = Field(paths.CLEAN, description="clean shards with the test split")
    runs: Path = Field(paths.REEVALUATE_RUNS, description="victim run folders go here")
    cron: str = Field("0 3 * * *", description="schedule of the `reevaluate/scheduled` deployment")
    victims: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1)


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "poison": PoisonConfig,
    "attack": AttackConfig,
    "victim": VictimConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
    "report": ReportConfig,
    "reevaluate": ReevaluateConfig,
}

# `mme bench` (mme/app/bench.py): its flags, kept here so `mme bench --help` needs no torch
# (not a params.yaml section: flags only)
PHASES = ("ceiling", "surrogate", "pgd", "hotflip", "load", "write_verify", "victim")


class BenchConfig(BaseModel):
    """What ``mme bench`` measures (command-line flags, not a params.yaml section)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("RN50", description="open_clip model config (surrogate and victim)")
    image_size: int | None = Field(None, ge=16, description="None: the model's own size")
    batch_size: int = Field(128, ge=2, description="pairs per batch")
    batches: int = Field(2, ge=1, description="batches of synthetic pairs (PGD/HotFlip/IO)")
    steps: int = Field(5, ge=1, description="timed surrogate steps / ceiling iterations")
    pgd_steps: int = Field(8, ge=1, description="PGD steps per timed noise update")
    trigger_len: int = Field(3, ge=1, description="trigger tokens k (HotFlip)")
    candidates: int = Field(16, ge=1, description="HotFlip candidates per position C")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available")
    compile: Literal["auto", "on", "off"] = Field("auto", description="auto: on with CUDA")
    phases: list[str] = Field(
        default_factory=lambda: list(PHASES), description="phases to time: " + " ".join(PHASES)
    )
    out: Path | None = Field(None, description="JSON results file")
