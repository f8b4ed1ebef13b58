"""The process environment mme needs, set before torch loads: one call per entry point.

Two settings are read once, when torch (libgomp, ATen, oneDNN, MKL) loads, so they must be in the
environment before ``import torch``:

- OpenMP waits (:func:`mme.cpuisa.short_openmp_spin`): threads spin briefly, then sleep, so a
  busy small machine is not held by spinning threads (no effect on results);
- the CPU kernels' instruction set (:func:`mme.cpuisa.pin`, ``poison.cpu_isa``): part of the
  bytes of a protected set.

Every entry point calls :func:`prepare_process_env`: the CLI (``mme.cli.main``), the lazy Python
API (``mme.__getattr__``), the dry run's time probe (``python -m mme.app.probe``), the Prefect
flows (``flows/__init__.py``) and the tests (``tests/conftest.py``). It is idempotent.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from mme import cpuisa


def prepare_process_env(
    isa: str | None = None, environ: MutableMapping[str, str] = os.environ
) -> None:
    """Short OpenMP spins (unless the user chose a wait policy) and, with ``isa``, the CPU
    kernels pinned to that level (``"avx2"``; ``"native"`` or None: left as they are).

    Effective only for what has not loaded yet: call it before ``import torch``."""
    cpuisa.short_openmp_spin(environ)
    if isa is not None:
        cpuisa.pin(isa, environ)
