"""The ``poison:`` settings of method keyed (:mod:`mme.protection.methods.keyed`), a base of
:class:`~mme.config.schema.PoisonConfig`.

Keyed also uses ``rounds``, ``surrogate_*``, ``epsilon``, ``batch_size``, ``eot``/``augment``,
``protect_fraction`` and ``seed``; it ignores the trigger, PGD and caption-shuffle settings. Its
own settings (:data:`KEYED_FIELDS`) are left out of the other methods' manifest and resume hash,
so their protected sets keep the bytes they had before keyed existed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class KeyedSettings(BaseModel):
    """Method keyed only (mme/protection/methods/keyed.py); it uses rounds, surrogate_*,
    epsilon, batch_size, eot and seed of PoisonConfig too, and ignores the trigger, PGD and
    caption-shuffle settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    key_min_captions: int = Field(
        2, ge=1, description="keyed: a word is key for an image in at least this many captions"
    )
    key_min_images: int | Literal["auto"] = Field(
        "auto",
        description="keyed: a key word needs this many images (auto: round(images/300) in 2..20)",
    )
    pattern_grid: int = Field(16, ge=1, le=64, description="keyed: pattern cells per side g")
    pattern_steps: int = Field(40, ge=0, description="keyed: Adam steps on the patterns a round")
    pattern_lr: float = Field(0.05, gt=0, description="keyed: Adam lr of the patterns")
    pattern_init: float = Field(
        2.0, ge=0, description="keyed: scale of the random +-1 initial patterns"
    )

    @field_validator("key_min_images")
    @classmethod
    def _at_least_one_image(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value


KEYED_FIELDS = tuple(KeyedSettings.model_fields)
