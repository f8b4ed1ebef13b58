"""Typed configuration (moving: the schema is mme/config/schema.py for now)."""

from mme.config.schema import *  # noqa: F403
from mme.config.schema import _metavar  # noqa: F401
