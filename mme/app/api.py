"""The Python API: ``mme.protect``, ``mme.prepare``, ``mme.poison``, ``mme.evaluate``.

Each takes a typed config (or its fields as keyword arguments) and returns a pydantic model::

    import mme

    result = mme.protect("photos/", "publish/", poison={"device": "cpu"})
    print(result.summary())

The four names are also the stage modules (``mme.poison`` is ``mme/protection/poison.py``), so
each of those modules is made callable: ``mme.poison(cfg)`` calls :func:`poison` here, while
``from mme.protection.poison import poison`` and ``mme poison`` keep working. Nothing heavy is
imported until a function runs: ``import mme`` loads neither torch nor open_clip.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from mme.config import DataConfig, EvaluateConfig, PoisonConfig
from mme.manifest import Manifest

NAMES = ("protect", "prepare", "poison", "evaluate")


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
    config: Any = None,
    /,
    *,
    resume: bool = False,
    **fields: Any,
) -> Any:
    """Protect a folder / CSV / shard folder into a publishable folder (``mme protect``).

    ``config`` is a :class:`mme.app.protect.ProtectConfig` (``fields`` replace its values,
    e.g. ``poison={"rounds": 2}``); returns a :class:`mme.app.protect.ProtectResult`.
    """
    from mme.app.protect import ProtectConfig
    from mme.app.protect import protect as run

    cfg = _config(ProtectConfig, config, {**fields, "input": input, "output": output})
    return run(cfg, resume=resume)


class _CallableModule(types.ModuleType):
    """A stage module that is also its API function: ``mme.poison(...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return globals()[self.__name__.rpartition(".")[2]](*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make ``sys.modules[module_name]`` (one of :data:`NAMES`) call its API function."""
    sys.modules[module_name].__class__ = _CallableModule
