"""Typed configuration, in four modules:

- :mod:`mme.config.schema`: one pydantic model per ``params.yaml`` section (plus ``mme bench``'s);
- :mod:`mme.config.profiles`: named sets of defaults (victim profiles, the photo profile);
- :mod:`mme.config.params`: reading ``params.yaml`` into those models;
- :mod:`mme.config.flags`: the command-line flags generated from the models;

and :mod:`mme.config.specs`, the grammar of ``mme attack``'s countermeasure specs. The public
names are re-exported here: ``from mme.config import PoisonConfig`` is the way to import them.
"""

from mme.config.flags import (
    add_model_arguments,
    add_params_argument,
    add_section_arguments,
    section_from_args,
    show_default,
)
from mme.config.keyed import KEYED_FIELDS
from mme.config.params import (
    DEFAULT_PARAMS,
    NO_PARAMS,
    default_shards,
    format_validation_error,
    load_section,
    params_file,
    read_params,
    reevaluation_victims,
)
from mme.config.profiles import (
    CPU_PROFILE,
    PHOTO_PROFILE,
    PROTECT_PROFILES,
    STANDALONE_PARAMS,
    VICTIM_PROFILES,
)
from mme.config.schema import (
    PHASES,
    SECTIONS,
    AttackConfig,
    BenchConfig,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    PoisonConfig,
    ReevaluateConfig,
    ReportConfig,
    Section,
    TrackingConfig,
    VictimConfig,
)

__all__ = [
    "DEFAULT_PARAMS",
    "KEYED_FIELDS",
    "NO_PARAMS",
    "PHASES",
    "CPU_PROFILE",
    "PHOTO_PROFILE",
    "PROTECT_PROFILES",
    "SECTIONS",
    "STANDALONE_PARAMS",
    "VICTIM_PROFILES",
    "AttackConfig",
    "BenchConfig",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "PoisonConfig",
    "ReevaluateConfig",
    "ReportConfig",
    "Section",
    "TrackingConfig",
    "VictimConfig",
    "add_model_arguments",
    "add_params_argument",
    "add_section_arguments",
    "default_shards",
    "format_validation_error",
    "load_section",
    "params_file",
    "read_params",
    "reevaluation_victims",
    "section_from_args",
    "show_default",
]
