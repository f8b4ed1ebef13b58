"""Cached Prefect task results that are data, never code.

A cached task result is read back from a file in Prefect's storage folder, and Prefect lets
that file choose how it is decoded: a record naming the ``pickle`` serializer is unpickled, and
Prefect's own JSON decoder imports whatever module a value names in ``__class__``. Both run
code from a file anyone who can write the folder may have planted. Here:

- :class:`PlainJSON` writes and reads only JSON's own types plus ``pathlib.Path`` (as
  ``{"__path__": "..."}``): it builds nothing else and imports nothing;
- :class:`PlainRecordsOnly` (the tasks' cache policy) points Prefect only at records written
  with :class:`PlainJSON`: under a key whose stored record is anything else, the task gets a
  key of its own and runs again, so the planted file is never read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.serializers import Serializer
from prefect.settings import get_current_settings
from prefect.utilities.hashing import hash_objects
from pydantic import Field

from mme import fsio

TYPE = "mme-plain-json"
MAX_RECORD = 1 << 24  # bytes of a result record: paths and dicts of floats are far smaller


def _plain(obj: Any) -> Any:
    """``obj`` as JSON types (a Path as ``{"__path__": ...}``); anything else is refused."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, PurePath):
        return {"__path__": str(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: _plain(v) for k, v in obj.items()}
    raise TypeError(f"a task result must be plain data or a Path, not {type(obj).__name__}")


def _built(obj: dict[str, Any]) -> Any:
    return Path(obj["__path__"]) if obj.keys() == {"__path__"} else obj


class PlainJSON(Serializer):
    """JSON of plain data and paths; decoding builds dicts, lists, numbers, strings, paths."""

    type: str = Field(default=TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(_plain(obj), sort_keys=True).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob, object_hook=_built)


def is_plain_record(content: bytes) -> bool:
    """True for a result record (at most :data:`MAX_RECORD` bytes) written with PlainJSON."""
    if len(content) > MAX_RECORD:
        return False
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return False
    return isinstance(serializer, dict) and serializer.get("type") == TYPE


@dataclass
class PlainRecordsOnly(CachePolicy):
    """``policy``'s cache key, unless the record stored under it (in Prefect's local result
    folder) was not written by :class:`PlainJSON`: then a key of its own, so Prefect never
    reads that file (nor is it deleted: mme did not make it) and the task runs again."""

    policy: CachePolicy | None = None

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        assert self.policy is not None
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        if key is None:
            return None
        path = Path(get_current_settings().results.local_storage_path).expanduser() / key
        if not (path.exists() or path.is_symlink()):
            return key
        try:
            content = fsio.read_regular(path, MAX_RECORD)
        except OSError:  # a link, a FIFO, a device, too big: not a record we wrote
            content = b"not a plain record"
        if is_plain_record(content):
            return key
        return hash_objects(key, "planted", hashlib.sha256(content).hexdigest())
