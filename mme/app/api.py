"""The Python API: ``mme.protect``, ``mme.prepare``, ``mme.poison``, ``mme.evaluate``.

Each takes a typed config (or its fields as keyword arguments) and returns a pydantic model::

    import mme

    result = mme.protect("photos/", "publish/", poison={"device": "cpu"})
    print(result.summary())

``mme.poison`` is :func:`poison` here (``mme/__init__.py`` re-exports the four lazily); each wraps
its stage's own function (``from mme.protection.poison import poison``, the same code as
``mme poison``) with a typed config and result. Nothing heavy is imported until a function runs:
``import mme`` loads neither torch nor open_clip. No stage imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from mme.config import DataConfig, EvaluateConfig, PoisonConfig
from mme.manifest import Manifest

if TYPE_CHECKING:  # the annotation only: importing the app's settings here costs nothing
    from mme.app.settings import ProtectResult


class RetrievalMetrics(BaseModel):
    """Image<->text retrieval on a clean test split (recalls in percent)."""

    model_config = ConfigDict(extra="allow")

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    rsum: float
    chance_rsum: float
    rsum_over_chance: float
    n_images: int
    n_captions: int


def _config(kind: type[BaseModel], config: BaseModel | None, fields: dict[str, Any]) -> Any:
    """``config`` with ``fields`` applied, or a new ``kind(**fields)``; validated either way."""
    from pydantic import ValidationError

    from mme.config import ConfigError

    base = config.model_dump() if config is not None else {}
    try:
        return kind(**{**base, **fields})
    except ValidationError as err:
        raise ConfigError(str(err)) from None


def prepare(config: DataConfig | None = None, /, **fields: Any) -> Manifest:
    """Ingest a dataset into shards (``mme prepare``); returns the clean manifest."""
    from mme.ingest.prepare import prepare as run

    return Manifest.model_validate(run(_config(DataConfig, config, fields)))


def poison(
    config: PoisonConfig | None = None, /, *, resume: bool = False, **fields: Any
) -> Manifest:
    """Protect a clean shard folder (``mme poison``); returns the protected set's manifest."""
    from mme.protection.poison import poison as run

    return Manifest.model_validate(run(_config(PoisonConfig, config, fields), resume=resume))


def evaluate(
    checkpoint: Path | str,
    shards: Path | str,
    config: EvaluateConfig | None = None,
    /,
    *,
    split: str = "test",
    model: str | None = None,
    **fields: Any,
) -> RetrievalMetrics:
    """Retrieval metrics of a victim ``checkpoint`` on ``shards``' clean ``split``."""
    from mme.victim.evaluate import evaluate_checkpoint

    cfg = _config(EvaluateConfig, config, fields)
    metrics = evaluate_checkpoint(cfg, Path(checkpoint), model, Path(shards), split)
    return RetrievalMetrics.model_validate(metrics)


def protect(
    input: Path | str,
    output: Path | str,
    /,
    *,
    private: Path | str | None = None,
    poison: dict[str, Any] | None = None,
    profile: Literal["auto", "gpu", "cpu"] = "auto",
    format: Literal["native", "working", "shards"] = "native",
    jpeg_quality: int = 98,
    keep_exif: bool = False,
    image_column: str = "images",
    caption_column: str = "caption",
    max_side: int | None = None,
    force: bool = False,
    resume: bool = False,
) -> ProtectResult:
    """Protect your photos into a folder you can publish (``mme protect INPUT OUTPUT``).

    ``input``: a folder of images with same-named ``.txt`` captions, a caption CSV
    (``image_column``, ``caption_column``), a folder of WebDataset shards, or a Hugging Face
    ``datasets`` folder / parquet. ``output`` gets every photo back under its own name, size and
    format (``format="native"``; JPEG at ``jpeg_quality``, EXIF removed unless ``keep_exif``),
    its captions and ``metadata.jsonl``; ``"working"`` / ``"shards"`` give the square
    working-size set instead. The private work area (``private``, default ``OUTPUT.private``)
    holds the originals and the noise: never publish it. ``profile`` picks the poison settings
    for the device (``auto``: gpu when CUDA is available), ``poison`` replaces any of them
    (e.g. ``{"rounds": 2}``). ``force`` replaces an earlier run, ``resume`` continues one.
    Returns a :class:`~mme.app.settings.ProtectResult` (``.summary()``: the closing screen).
    """
    from mme.app.protect import protect as run
    from mme.app.settings import ProtectConfig

    fields = dict(private=private, poison=poison or {}, profile=profile, format=format,
                  jpeg_quality=jpeg_quality, keep_exif=keep_exif, image_column=image_column,
                  caption_column=caption_column, max_side=max_side, force=force)  # fmt: skip
    cfg = _config(ProtectConfig, None, {**fields, "input": input, "output": output})
    return run(cfg, resume=resume)
