"""Two JAX processes of 2 CPU devices each, joined over loopback into one 4-device mesh.

The test side runs a worker script twice (:func:`run_workers`); the worker side joins the
mesh first thing (:func:`join`), before anything else imports JAX. Used by the multi-process
tests of the engine and the autotuner; :func:`free_port` by the launch tests too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(script: str, outs: list[Path], *, timeout: float) -> None:
    """Runs ``python tests/SCRIPT ID PORT OUT`` as processes 0 and 1 (``outs[ID]`` their
    output files) and asserts that both exit 0 within ``timeout`` seconds."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, script), str(i), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i, out in enumerate(outs)
    ]
    try:
        logs = [
            worker.communicate(timeout=timeout)[0].decode(errors="replace") for worker in workers
        ]
    finally:
        for worker in workers:
            worker.kill()
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]


def join() -> tuple[int, str]:
    """In a worker, before anything imports JAX: 2 CPU devices, ``jax.distributed`` with the
    other process at the port of ``sys.argv``; returns (process id, output file)."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.device_count() == 4, jax.devices()
    return process_id, out
