"""``mme protect``'s settings: what the user gives (:class:`ProtectConfig`), what comes back
(:class:`ProtectResult`), and the stage configs derived from them (INPUT's kind, the ``data:`` and
``poison:`` sections of the run, the hash a resumed run must match).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mme.config import PROTECT_PROFILES, ConfigError, DataConfig, PoisonConfig

# poison fields a user of `protect` does not set: the work area decides them
FIXED = ("clean", "out", "private")


class ProtectConfig(BaseModel):
    """Settings of :func:`protect`. ``poison`` keys replace the ``profile``'s values
    (:data:`~mme.config.PROTECT_PROFILES`)."""

    model_config = ConfigDict(extra="forbid")

    input: Path = Field(description="image folder, caption CSV, or shard folder")
    output: Path = Field(description="the publishable folder to write")
    private: Path | None = Field(None, description="private work area (default OUTPUT.private)")
    poison: dict[str, Any] = Field(default_factory=dict, description="poison: section overrides")
    profile: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="poison settings for this device (auto: gpu when CUDA is available)"
    )
    format: Literal["native", "working", "shards"] = Field(
        "native",
        description="native: your photos back at their own names, sizes and formats; working: "
        "<id>.png at the surrogate's square size; shards: those as WebDataset tars",
    )
    jpeg_quality: int = Field(
        98, ge=90, le=100, description="JPEG quality of protected JPEGs (4:4:4 chroma)"
    )
    keep_exif: bool = Field(False, description="keep the photos' EXIF (GPS, camera, dates)")
    image_column: str = Field("images", description="CSV: the image path column")
    caption_column: str = Field("caption", description="CSV: the caption column")
    max_side: int | None = Field(None, ge=16, description="resize inputs first (short side)")
    force: bool = Field(False, description="replace a non-empty OUTPUT / start over")

    @property
    def private_dir(self) -> Path:
        return self.private or self.output.with_name(self.output.name + ".private")


class ProtectResult(BaseModel):
    """What :func:`protect` did: the one-screen summary as data."""

    output: Path
    private: Path
    images: int
    captions: int
    protected: int
    skipped: dict[str, int]
    method: str
    profile: str
    epsilon: float
    working_size: int
    max_linf: int
    psnr_mean: float | None
    ssim_mean: float | None
    format: str
    formats: dict[str, int] = Field(default_factory=dict)  # published files per format
    kept_min: float | None = None  # least share of the noise a lossy (JPEG) file kept
    verified: bool
    seconds: float
    stage_seconds: dict[str, float] = Field(default_factory=dict)  # wall time of each stage

    def summary(self) -> str:
        """The closing screen of ``mme protect``."""
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"
        q = (
            f"PSNR {self.psnr_mean:.1f} dB, SSIM {self.ssim_mean:.3f} (means, at "
            f"{self.working_size} px)"
            if self.psnr_mean is not None and self.ssim_mean is not None
            else "PSNR/SSIM n/a"
        )
        trig = ", each starting with its image's trigger words" if self.method == "mem" else ""
        return "\n".join(
            [
                f"mme protect: done in {self.seconds:.0f} s -- verified: "
                + ("yes" if self.verified else "NO"),
                f"  images     {self.images} in, {self.protected} protected, skipped: {skipped}",
                f"  captions   {self.captions}{trig}",
                f"  noise      {self.method} ({self.profile} profile), epsilon "
                f"{self.epsilon:g}/255 (max seen {self.max_linf}); {q}",
                f"  PUBLISH    {self.output}/  ({self._published()})",
                f"  PRIVATE    {self.private}/  (originals, noise.npy: never publish; see its "
                "README.txt)",
            ]
            + (
                [f"  CHECK      mme verify --run {self.private} --native {self.output}"]
                if self.format == "native"
                else []
            )
        )

    def _published(self) -> str:
        if self.format != "native":
            return f"{self.format} format, {self.working_size} px; metadata, README.txt"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        kept = "" if self.kept_min is None else f"; JPEGs keep >= {self.kept_min:.0%} of the noise"
        return f"your photos at their own names, sizes and formats: {kinds}{kept}"


def input_kind(path: Path) -> Literal["csv", "folder", "webdataset", "hf"]:
    """What INPUT is; a one-line error naming the accepted kinds otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    hf_marks = ("state.json", "dataset_dict.json")
    if path.suffix == ".parquet" or any((path / m).is_file() for m in hf_marks):
        return "hf"
    if path.is_dir():
        if any(path.glob("*.tar")):
            return "webdataset"
        return "hf" if any(path.glob("*.parquet")) else "folder"
    if path.is_file() and path.suffix == ".tar":
        return "webdataset"
    raise ConfigError(
        f"input {str(path)!r} is neither a folder nor a .csv/.tar file: give a folder of images "
        "with same-named .txt captions, a caption CSV, or a folder of shards"
    )


def data_config(cfg: ProtectConfig) -> DataConfig:
    kind = input_kind(cfg.input)
    clean = cfg.private_dir / "clean"
    common = {"out": clean, "source": kind, "test_fraction": 0.0, "max_side": cfg.max_side}
    if kind == "hf":
        cols = {"image_column": cfg.image_column, "caption_column": cfg.caption_column}
        return DataConfig(**common, input=cfg.input, **cols)
    if kind == "csv":
        delimiter = "\t" if cfg.input.suffix.lower() == ".tsv" else ","
        return DataConfig(
            **common,
            csv=cfg.input,
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
            delimiter=delimiter,
        )
    return DataConfig(**common, input=cfg.input)


def resolve_profile(cfg: ProtectConfig) -> str:
    """``cfg.profile``, with ``auto`` decided by the device the run will use."""
    if cfg.profile != "auto":
        return cfg.profile
    device = cfg.poison.get("device", "auto")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), for the loop's threads."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def poison_config(cfg: ProtectConfig) -> PoisonConfig:
    """The profile's settings, then ``cfg.poison``'s; the loop uses every usable core unless
    ``threads`` is given (the DVC pipeline's fixed ``poison.threads`` is its own)."""
    bad = sorted(set(cfg.poison) & set(FIXED))
    if bad:
        raise ConfigError(f"protect sets {', '.join(bad)} itself: leave them out")
    values = {**PROTECT_PROFILES[resolve_profile(cfg)], "threads": usable_cores(), **cfg.poison}
    private = cfg.private_dir
    return PoisonConfig(
        **values, clean=private / "clean", out=private / "protected", private=private / "noise"
    )


# settings of the publish stage only: --resume with other values publishes again
PUBLISH_KEYS = ("format", "jpeg_quality", "keep_exif")


def publish_settings(cfg: ProtectConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in PUBLISH_KEYS}


def settings_hash(cfg: ProtectConfig) -> str:
    """What the protection depends on: a resumed run must match it (the publish settings may
    change: that stage runs again)."""
    keep = cfg.model_dump(mode="json", exclude={"force", "output", "private", *PUBLISH_KEYS})
    keep["poison"] = poison_config(cfg).model_dump(mode="json", exclude={"device", "compile"})
    keep["input"] = str(Path(cfg.input).resolve())
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
