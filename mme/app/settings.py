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

from mme.config import PHOTO_PROFILE, ConfigError, DataConfig, PoisonConfig

# poison fields a user of `protect` does not set: the work area decides them
FIXED = ("clean", "out", "private")


class ProtectConfig(BaseModel):
    """Settings of :func:`protect`. ``poison`` keys replace :data:`~mme.config.PHOTO_PROFILE`."""

    model_config = ConfigDict(extra="forbid")

    input: Path = Field(description="image folder, caption CSV, or shard folder")
    output: Path = Field(description="the publishable folder to write")
    private: Path | None = Field(None, description="private work area (default OUTPUT.private)")
    poison: dict[str, Any] = Field(default_factory=dict, description="poison: section overrides")
    image_column: str = "images"
    caption_column: str = "caption"
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
    epsilon: float
    working_size: int
    max_linf: int
    psnr_mean: float | None
    ssim_mean: float | None
    verified: bool
    seconds: float

    def summary(self) -> str:
        """The closing screen of ``mme protect``."""
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"
        q = (
            f"PSNR {self.psnr_mean:.1f} dB, SSIM {self.ssim_mean:.3f} (means)"
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
                f"  noise      {self.method}, epsilon {self.epsilon:g}/255 (max seen "
                f"{self.max_linf}), {self.working_size}x{self.working_size} px; {q}",
                f"  PUBLISH    {self.output}/  (images, captions, metadata.jsonl, README.txt)",
                f"  PRIVATE    {self.private}/  (originals, noise.npy, triggers.json: never "
                "publish; see its README.txt)",
            ]
        )


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


def poison_config(cfg: ProtectConfig) -> PoisonConfig:
    bad = sorted(set(cfg.poison) & set(FIXED))
    if bad:
        raise ConfigError(f"protect sets {', '.join(bad)} itself: leave them out")
    values = {**PHOTO_PROFILE, **cfg.poison}
    private = cfg.private_dir
    return PoisonConfig(
        **values, clean=private / "clean", out=private / "protected", private=private / "noise"
    )


def settings_hash(cfg: ProtectConfig) -> str:
    """What the result depends on: a resumed run must match it."""
    keep = cfg.model_dump(mode="json", exclude={"force", "output", "private"})
    keep["poison"] = poison_config(cfg).model_dump(mode="json", exclude={"device", "compile"})
    keep["input"] = str(Path(cfg.input).resolve())
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
