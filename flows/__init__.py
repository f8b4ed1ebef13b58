"""Prefect 3 flows over the ``mme`` library: ``mme-pipeline`` and ``reevaluate`` (+ ``serve``).

The flows only call tasks (:mod:`flows.tasks`); the tasks are thin typed wrappers of the stage
functions in :mod:`mme`, which knows nothing about Prefect.

Importing this package turns telemetry off before Prefect or MLflow is imported, so every entry
point (``python -m flows.pipeline``, ``python -m flows.reevaluate``, ``python -m flows.serve``,
a worker importing the flows) stays offline, not only the Make targets. A value the user set
explicitly is kept.

It also prepares the process environment before torch loads (mme/env.py): OpenMP waits as under
the `mme` command, and the CPU kernels pinned to ``poison.cpu_isa``'s default level (AVX2): the
poison task runs in this process, and the pin cannot be set once torch is loaded. A flow run
with ``poison.cpu_isa: native`` therefore runs the pinned kernels.
"""

import os

from mme.env import prepare_process_env

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",  # the cross-tool convention (MLflow, Prefect's client)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's usage heartbeat
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)
prepare_process_env("avx2")  # the tasks run mme in-process
