"""Start an ``mme`` stage under ``torchrun`` from a Prefect task (``poison.nproc`` /
``victim.nproc`` > 1), its output streamed line by line into the task's log.

A DDP run needs one process per GPU, which the task's own process cannot be: the task writes
its section to a temporary params file and runs ``python -m torch.distributed.run --standalone
--nproc_per_node N -m mme COMMAND --params FILE ...``, the same command ``dvc.yaml`` runs. The
child imports the same ``mme`` as this process, and its MLflow runs nest in the flow's run
(:func:`mme.track.tracking.child_env`). A failed launch raises with the output's last lines.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel

import mme
from mme.track import tracking

TAIL_LINES = 100  # of the child's output, in the error when it fails
WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def argv(nproc: int, command: str, params: Path, extra: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m mme COMMAND --params PARAMS EXTRA``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", str(nproc), "-m", "mme", command]
    return [*launcher, "--params", str(params), *extra]


def child_env() -> dict[str, str]:
    """This environment, minus a surrounding torchrun's world, plus the MLflow parent run; the
    folder this ``mme`` was imported from comes first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    source = str(Path(mme.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the task log as they are printed
    return env | tracking.child_env()


def write_params(path: Path, section: str, cfg: BaseModel) -> Path:
    """``path`` as a params file whose ``section`` is ``cfg`` (every field written out)."""
    path.write_text(yaml.safe_dump({section: cfg.model_dump(mode="json")}))
    return path


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run
        return logging.getLogger(__name__)


def launch(
    nproc: int, command: str, section: str, cfg: BaseModel, extra: list[str] | None = None
) -> None:
    """Run ``mme COMMAND`` under torchrun with ``cfg`` as params.yaml's ``section``."""
    log = _logger()
    with tempfile.TemporaryDirectory(prefix="mme-torchrun-") as tmp:
        params = write_params(Path(tmp) / "params.yaml", section, cfg)
        cmd = argv(nproc, command, params, list(extra or []))
        log.info("torchrun: %s", " ".join(cmd[1:]))
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        # its own session: a cancelled task takes torchrun and every rank down with it
        proc = subprocess.Popen(
            cmd,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    tail.append(line)
                    log.info("%s", line)
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if rc != 0:
        raise RuntimeError(
            f"torchrun -m mme {command} ({nproc} processes) exited with {rc}:\n" + "\n".join(tail)
        )
