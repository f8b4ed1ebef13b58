"""``manifest.json``: one typed model of the file every shard folder carries, read/written here.

``mme prepare`` writes a clean folder's manifest (counts per split, skipped items, the data
config); ``mme poison`` a protected folder's (method, epsilon, the effective trigger length, the
working size, per-round losses, the verify summary). Readers use :func:`read_manifest` and the
properties below instead of each digging through the dict its own way.

One trigger length: ``trigger_len`` at the top level is the number of trigger tokens actually
prepended (0 for the baselines, which have no trigger); the poison config a baseline records has
no ``trigger_len`` of its own, so the two can never disagree. Older baseline manifests, whose
config still says 3 next to a top-level 0, read as 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mme.config import ConfigError

FILENAME = "manifest.json"


class SplitRecord(BaseModel):
    """One split: counts and its shards (``{"name", "sha256", ...}`` each)."""

    model_config = ConfigDict(extra="allow")

    images: int = Field(0, ge=0)
    captions: int = Field(0, ge=0)
    shards: list[dict[str, Any]] = Field(default_factory=list)


class Manifest(BaseModel):
    """A shard folder's ``manifest.json``. Unknown keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")

    created_by: str = "unknown"
    version: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, SplitRecord] = Field(default_factory=dict)
    # protected sets (mme poison)
    method: str | None = None
    epsilon: float | None = Field(None, gt=0, le=255)
    trigger_len: int | None = Field(None, ge=0, le=16)
    # where the trigger sits in each caption; absent: at the start (the word of each image: in
    # the private triggers.json only)
    trigger_position: Literal["start", "random"] | None = None
    working_size: int | None = Field(None, ge=1)
    n_protected: int | None = Field(None, ge=0)
    verify: dict[str, Any] | None = None
    # protected sets: the clean set's version (sha256 of its manifest.json), never its path
    clean_manifest_sha256: str | None = None
    # attacked copies (mme attack): the transformation a data user applied
    attack: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _describe_from_records(cls, data: Any) -> Any:
        """Older or hand-made manifests name method/epsilon/trigger_len only in their
        ``poison`` or ``config`` record: the top level takes the first one found."""
        if not isinstance(data, dict):
            return data
        records = [r for r in (data.get("poison"), data.get("config")) if isinstance(r, dict)]
        filled = dict(data)
        for key in ("method", "epsilon", "trigger_len"):
            if filled.get(key) is None:
                found = [r[key] for r in records if isinstance(r.get(key), str | int | float)]
                filled[key] = found[0] if found else None
        return filled

    @model_validator(mode="after")
    def _one_trigger_len(self) -> Manifest:
        if self.method is not None and self.method != "mem":
            self.trigger_len = 0  # baselines prepend nothing, whatever an old config says
        return self

    @property
    def protected(self) -> bool:
        return self.method is not None

    def images(self, split: str = "train") -> int:
        return self.splits[split].images if split in self.splits else 0

    def data_record(self) -> dict[str, Any]:
        """What a victim trained on this folder records: method, epsilon, trigger_len, attack."""
        if not self.protected:
            return {"method": "clean", "epsilon": None, "trigger_len": None, "attack": self.attack}
        return {
            "method": self.method,
            "epsilon": self.epsilon,
            "trigger_len": self.trigger_len,
            "attack": self.attack,
        }


def read_manifest(folder: Path) -> Manifest:
    """The manifest of ``folder``; FileNotFoundError when absent, ConfigError when malformed
    (read by :func:`mme.shards.load_manifest`: a regular file, size-capped, a JSON object)."""
    from mme.shards import BadShard, load_manifest

    path = Path(folder) / FILENAME
    try:
        return Manifest.model_validate(load_manifest(Path(folder)))
    except (BadShard, ValidationError) as err:
        raise ConfigError(f"{path} is not a valid manifest: {err}".splitlines()[0]) from None


def write_manifest(folder: Path, manifest: Manifest | dict[str, Any]) -> Manifest:
    """Validate and write ``folder/manifest.json`` atomically; returns the model.

    A dict is written exactly as given once it validates: the bytes of a manifest are its
    dataset version (``shards.manifest_sha256``), so the model must not re-serialise it.
    """
    from mme import fsio

    if isinstance(manifest, Manifest):
        raw = manifest.model_dump(mode="json", exclude_none=True)
    else:
        raw = manifest
    model = Manifest.model_validate(raw)
    fsio.write_json(Path(folder) / FILENAME, raw)
    return model
