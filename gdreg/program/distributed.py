"""Start-up of JAX's multi-controller runtime: one Python process per host (or per GPU).

``jax.distributed.initialize`` connects the processes through a coordinator (process 0);
afterwards ``jax.devices()`` lists the devices of every process and the code in
:mod:`gdreg.engine.fullbatch` runs unchanged. Launches are detected from explicit flags or from
SLURM's environment (see ``launch/``).

SLURM. Inside an ``srun`` step with more than one task the coordinator is the first node of
the step (``SLURM_STEP_NODELIST``) on port ``JAX_COORDINATOR_PORT`` or, as in JAX's own SLURM
detection, ``61440 + SLURM_JOB_ID % 4096``; the process id and count are ``SLURM_PROCID`` and
``SLURM_NTASKS``. Which local GPUs a process uses:

* one task per node (``SLURM_NTASKS`` equals the step's node count): all GPUs of the node.
  JAX's own detection would give every process only the GPU numbered ``SLURM_LOCALID``,
  i.e. one GPU per node; this module avoids that.
* several tasks per node: the GPU numbered ``SLURM_LOCALID`` (JAX's rule), unless SLURM
  already bound a single GPU to the task (``CUDA_VISIBLE_DEVICES`` names one device), in
  which case that one.
* ``JAX_LOCAL_DEVICE_IDS=0,1`` overrides both.

Failures at start-up are reported in one line: a process that is not joined by all others
within ``timeout_seconds`` exits with :data:`gdreg.program.exitcodes.JOIN_TIMEOUT` (JAX itself would
abort with a C++ stack trace), and processes started with different configs raise
:class:`ConfigMismatchError` naming the fields that differ.

Failures later on: a process lost during the run (killed, crashed, stopped, silent for
``heartbeat_timeout`` seconds) makes JAX's runtime end the others; :mod:`gdreg.program.supervisor`
reports that in one line with :data:`gdreg.program.exitcodes.LOST_PROCESS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping

import jax
import numpy as np

from gdreg.program import exitcodes
from gdreg.program.config import flatten
from gdreg.program.supervisor import DEFAULT_HEARTBEAT_TIMEOUT, launched_by_slurm, slurm_num_tasks

# Port rule of JAX's SlurmCluster (jax/_src/clusters/slurm_cluster.py): an ephemeral port
# derived from the job id, so that every task computes the same one.
_SLURM_PORT_BASE = 65535 - 2**12 + 1


class StartupError(RuntimeError):
    """The processes could not start together; the message says why, in one line."""


class ConfigMismatchError(StartupError):
    """The processes were started with different configs."""


# ----- CPU devices -------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity mask, which SLURM and taskset set)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_devices_for(requested: int, *, fullbatch: bool, batch_size: int = 0) -> int:
    """How many JAX devices a CPU host is split into (``config.train.cpu_devices``).

    ``requested`` when positive; else one device per usable core for full-batch work (blocks
    are independent, so each core runs its own blocks, which beats one device that spreads
    every small convolution over all cores; see docs/performance.md), and for stochastic
    training the largest count up to the usable cores that divides ``batch_size`` (each
    minibatch is split evenly over the devices, :mod:`gdreg.engine.train_step`; 1 without a batch
    size).
    """
    if requested > 0:  # a negative value is reported by the config check later
        return int(requested)
    cores = usable_cores()
    if fullbatch:
        return cores
    return max(
        (n for n in range(1, cores + 1) if batch_size > 0 and batch_size % n == 0), default=1
    )


def configure_cpu_devices(count: int) -> bool:
    """Makes the CPU backend expose ``count`` devices (``jax_num_cpu_devices``).

    Does nothing, and returns False, where the user already chose a count
    (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, or ``JAX_NUM_CPU_DEVICES``)
    or JAX's backends are already running (the count is fixed at start-up). Affects only the
    CPU backend: on a GPU host the GPUs stay the default devices.
    """
    if count < 1:
        raise ValueError(f"the number of CPU devices must be at least 1, got {count}")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    if jax.config.jax_num_cpu_devices >= 0:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialized
        return False
    return True


# ----- SLURM ------------------------------------------------------------------------------


def first_hostname(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-004,9],cpu1"`` -> ``"gpu003"``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    if match is None or not match.group(0):
        raise StartupError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0]
    return f"{prefix}{first}{suffix}"


def _visible_device_count(environ: Mapping[str, str]) -> int | None:
    for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = environ.get(name)
        if value is not None and value.strip():
            return len([part for part in value.split(",") if part.strip()])
    return None


def slurm_settings(environ: Mapping[str, str] | None = None) -> dict:
    """``jax.distributed.initialize`` arguments for this task of an ``srun`` step.

    Returns ``coordinator_address``, ``num_processes``, ``process_id`` and
    ``local_device_ids`` (None: every device the process can see); see the module docstring.
    """
    environ = os.environ if environ is None else environ
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
    )
    if not nodelist:
        raise StartupError("SLURM_STEP_NODELIST is not set; start the processes with srun")
    port = environ.get("JAX_COORDINATOR_PORT")
    if not port:
        if "SLURM_JOB_ID" not in environ:
            raise StartupError("SLURM_JOB_ID is not set; start the processes with srun")
        port = str(int(environ["SLURM_JOB_ID"]) % 2**12 + _SLURM_PORT_BASE)
    num_tasks = slurm_num_tasks(environ)
    num_nodes = int(
        environ.get("SLURM_STEP_NUM_NODES")
        or environ.get("SLURM_NNODES")
        or environ.get("SLURM_JOB_NUM_NODES")
        or "1"
    )
    local_device_ids = None
    if (
        "JAX_LOCAL_DEVICE_IDS" not in environ
        and num_tasks > num_nodes
        and _visible_device_count(environ) != 1
    ):
        local_device_ids = [int(environ.get("SLURM_LOCALID", "0"))]
    return {
        "coordinator_address": f"{first_hostname(nodelist)}:{port}",
        "num_processes": num_tasks,
        "process_id": int(environ["SLURM_PROCID"]),
        "local_device_ids": local_device_ids,
    }


# ----- start-up ---------------------------------------------------------------------------


class _JoinWatchdog:
    """Ends the process with one clear line if the processes have not all joined in time.

    ``jax.distributed.initialize`` blocks in C++ until every process has connected and, on
    its deadline, aborts with a stack trace; this thread fires first.
    """

    def __init__(self, timeout_seconds: float, describe: str) -> None:
        self.done = threading.Event()
        self.timeout_seconds = timeout_seconds
        self.describe = describe
        self.thread = threading.Thread(target=self._watch, name="join-watchdog", daemon=True)

    def _watch(self) -> None:
        if self.done.wait(self.timeout_seconds):
            return
        sys.stderr.write(
            f"error: {self.describe}: not all processes joined within "
            f"{self.timeout_seconds:g} s (--initialization_timeout); check that every "
            "process was started, with the same --coordinator_address and --num_processes, "
            "and that process 0's host and port are reachable\n"
        )
        sys.stderr.flush()
        os._exit(exitcodes.JOIN_TIMEOUT)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_seconds: int = 300,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> bool:
    """Initializes ``jax.distributed`` when this is one of several processes.

    Explicit arguments win; otherwise SLURM's variables are used (see the module docstring).
    A single process does nothing but log its devices. Returns whether the runtime was
    initialized. A process that is not joined by all others within ``timeout_seconds``
    exits with :data:`gdreg.program.exitcodes.JOIN_TIMEOUT` after printing one line. A process
    silent for ``heartbeat_timeout`` seconds is declared lost by JAX's runtime, which then ends
    the others (:mod:`gdreg.program.supervisor` turns that into one line).
    """
    explicit = coordinator_address is not None or process_id is not None or (num_processes or 1) > 1
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise StartupError(
                "a multi-process launch needs --coordinator_address, --num_processes and "
                "--process_id together"
            )
        if not 0 <= process_id < num_processes:
            raise StartupError(
                f"--process_id must be in [0, {num_processes}) for --num_processes="
                f"{num_processes}, got {process_id}"
            )
        settings = {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
            "local_device_ids": None,
        }
    elif launched_by_slurm():
        settings = slurm_settings()
    else:
        settings = None

    if settings is not None and settings["num_processes"] > 1:
        # gdreg handles SIGTERM itself (train.py: finish the epoch, checkpoint, exit 75). JAX's
        # preemption service would otherwise swallow a SIGTERM that arrives before training.
        jax.config.update("jax_enable_preemption_service", False)
        describe = (
            f"process {settings['process_id']} of {settings['num_processes']} "
            f"(coordinator {settings['coordinator_address']})"
        )
        logging.info("joining %s", describe)
        with _JoinWatchdog(timeout_seconds, describe):
            jax.distributed.initialize(
                **settings,
                # All values are given: no cluster auto-detection (which would restrict a
                # one-per-node SLURM process to a single GPU).
                cluster_detection_method="deactivate",
                # Our watchdog reports a late process; JAX's own deadline only backs it up.
                initialization_timeout=int(timeout_seconds) + 60,
                heartbeat_timeout_seconds=int(heartbeat_timeout),
            )
        initialized = True
    else:
        initialized = False
    logging.info(
        "process %d of %d; local devices %s; %d devices in all",
        jax.process_index(),
        jax.process_count(),
        [str(device) for device in jax.local_devices()],
        jax.device_count(),
    )
    return initialized


def shutdown() -> None:
    """Leaves the distributed runtime (a no-op for a single process)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# ----- a lost process ---------------------------------------------------------------------

# What a collective operation or barrier raises when the process on the other end is gone.
_LOST_CONTACT = (
    "Gloo",
    "NCCL",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "Barrier",
    "coordination service",
)


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` (raised in a multi-process run) looks like a peer that is gone."""
    return jax.process_count() > 1 and any(marker in str(error) for marker in _LOST_CONTACT)


def await_runtime_verdict(error: BaseException, heartbeat_timeout: float) -> None:
    """Waits, quietly, for JAX's runtime to end this process after ``error`` (see
    :func:`lost_contact`): the runtime knows which process is lost and says so within
    ``heartbeat_timeout`` seconds, and the supervising parent turns that into one line. Should it
    not, this ends the process itself, with one line and
    :data:`gdreg.program.exitcodes.LOST_PROCESS`. Never returns."""
    logging.info("a step across processes failed (%s); waiting for the runtime", error)
    time.sleep(heartbeat_timeout + 30)
    first = " ".join(str(error).split())[:200]
    sys.stderr.write(
        f"error: a step across processes failed ({first}); another process is probably lost: "
        "rerun every process with the same --workdir to resume from the last checkpoint\n"
    )
    sys.stderr.flush()
    # Not sys.exit: the runtime's exit handlers would wait for the lost process.
    os._exit(exitcodes.LOST_PROCESS)


# ----- consistency across processes -------------------------------------------------------


def _differences(mine: str, theirs: str, limit: int = 5) -> str:
    try:
        a, b = flatten(json.loads(mine)), flatten(json.loads(theirs))
    except ValueError:
        return "the configs differ"
    keys = sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))
    parts = [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts) or "the configs differ"


def all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective call: every process must make it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(_allgather(np.asarray([ok]))))


def _allgather(array: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array))


def check_same_config(config, workdir: str | None = None) -> None:
    """Fails fast, on every process, when the processes were started with different configs.

    ``workdir`` (the ``--workdir`` flag as given) is compared too. Raises
    :class:`ConfigMismatchError` naming the processes and the first fields that differ from
    process 0's.
    """
    if jax.process_count() == 1:
        return
    fields = json.loads(config.to_json_best_effort(sort_keys=True))
    if workdir is not None:
        fields["--workdir"] = workdir
    text = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(text.encode()).digest()
    mine = np.frombuffer(digest[:8], dtype=np.int64)
    every = _allgather(mine).reshape(-1)
    differing = [i for i, value in enumerate(every) if value != every[0]]
    if not differing:
        return
    # Collect the texts (padded to a common length) to name the differing fields.
    payload = np.frombuffer(text.encode(), dtype=np.uint8)
    lengths = _allgather(np.asarray([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: payload.size] = payload
    texts = _allgather(padded).reshape(len(lengths), -1)
    first = differing[0]
    reference = bytes(texts[0, : lengths[0]]).decode(errors="replace")
    other = bytes(texts[first, : lengths[first]]).decode(errors="replace")
    names = ", ".join(str(i) for i in differing)
    raise ConfigMismatchError(
        f"process{'es' if len(differing) > 1 else ''} {names} got a config different from "
        f"process 0's (process 0 vs {first}: {_differences(reference, other)}); every "
        "process must get the same --config, overrides and --workdir"
    )
