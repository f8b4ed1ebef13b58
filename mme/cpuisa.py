"""Pin the CPU kernels of the poison loop to one instruction set (``poison.cpu_isa``).

PyTorch (ATen), oneDNN and MKL pick their float kernels by CPU: an AVX-512 machine sums in other
orders than an AVX2 one, the surrogate drifts, and the protected set gets other bytes (measured:
docs/orchestration.md, "Reproducibility"). Each library reads its pin from the environment once,
when torch loads or at its first call, so the pin must be set before ``import torch``:
every entry point does it through :func:`mme.env.prepare_process_env`; other Python callers call
:func:`pin` first.

Kept free of torch at import time: the CLI calls :func:`pin` before anything loads it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping

from mme.config import ConfigError

# what each library calls the level; AVX2 (with FMA) is on every x86-64 server CPU since 2013
PINS: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (DispatchStub)
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels (convolution, GELU, ...)
        "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility branch (GEMM)
    },
}
ATEN_NAME = {"avx2": "AVX2"}  # torch.backends.cpu.get_cpu_capability() once pinned


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def pin(isa: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Put ``isa``'s pins into the environment (``native``: leave it as it is).

    Overrides what the environment says: the pin is part of the result, like ``poison.seed``.
    Effective only for libraries not loaded yet, i.e. call it before ``import torch``
    (:func:`mme.env.prepare_process_env` does, for every entry point)."""
    if isa == "native" or not x86():
        return
    environ.update(PINS[isa])


def check(isa: str) -> None:
    """Raise ConfigError unless this process runs ``isa``'s kernels (call before the loop)."""
    if isa == "native" or not x86():
        return  # elsewhere the x86 levels do not exist: bytes are those of this kind of machine
    import torch

    wrong = {k: os.environ.get(k) for k, v in PINS[isa].items() if os.environ.get(k) != v}
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != ATEN_NAME[isa] and not wrong:
        raise ConfigError(
            f"poison.cpu_isa = {isa!r}: this CPU runs {capability} kernels only "
            "(no AVX2): set poison.cpu_isa: native (its bytes are this machine's own)"
        )
    if wrong or capability != ATEN_NAME[isa]:
        names = " ".join(f"{k}={v}" for k, v in PINS[isa].items())
        raise ConfigError(
            f"poison.cpu_isa = {isa!r} needs {names} in the environment before torch is "
            f"imported (here: ATen runs {capability}, {wrong}): `mme poison` sets it; from Python "
            f"call mme.cpuisa.pin({isa!r}) before `import torch`, or set poison.cpu_isa: native"
        )


# libgomp (the OpenMP of torch's CPU wheels) lets a thread that waits at a barrier spin for
# GOMP_SPINCOUNT iterations before it sleeps: 300,000 by default, 0 with OMP_WAIT_POLICY=PASSIVE.
# On a small machine where anything else runs (the victim trainer's data-loader worker, a second
# job, a test suite) a spinning thread holds the core that the thread it waits for needs.
# Measured on 2 cores (docs/orchestration.md, "OpenMP waits"): under load a surrogate step took
# 10.4 s with the default and 2.7 s with PASSIVE; idle, PASSIVE cost 10 % on the poison loop and
# 33 % on the victim, while 10,000 spins matched the default. Results do not change: the same
# threads do the same share of every kernel.
SPINCOUNT = "10000"


def short_openmp_spin(environ: MutableMapping[str, str] = os.environ) -> None:
    """Let OpenMP threads spin briefly, then sleep, unless the user chose a wait policy.

    libgomp reads it once, when torch loads: call before ``import torch``."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPINCOUNT
