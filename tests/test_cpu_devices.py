"""How gdreg splits a CPU host into JAX devices (gdreg.program.distributed.configure_cpu_devices).

The device count is fixed when JAX starts its backends, so every case runs in a fresh
interpreter without the test session's 8-device XLA flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdreg.program import distributed

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import os, sys
requested, fullbatch, touch_jax_first = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
if sys.argv[4]:
    os.sched_setaffinity(0, {int(core) for core in sys.argv[4].split(",")})
import jax
from gdreg.program import distributed
if touch_jax_first:
    jax.devices()
applied = distributed.configure_cpu_devices(
    distributed.cpu_devices_for(requested, fullbatch=fullbatch)
)
print(applied, jax.device_count())
"""


def _probe(
    requested: int,
    fullbatch: bool,
    *,
    cores: set[int] | None = None,
    touch_jax_first: bool = False,
    **env_extra: str,
) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **env_extra)
    cores_arg = ",".join(str(core) for core in sorted(cores or ()))
    flags = [str(requested), str(int(fullbatch)), str(int(touch_jax_first)), cores_arg]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    applied, count = result.stdout.split()
    return applied == "True", int(count)


needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)"
)


@needs_affinity
def test_full_batch_gets_one_device_per_core_of_the_affinity_mask():
    cores = sorted(os.sched_getaffinity(0))
    assert _probe(0, True, cores={cores[0]}) == (True, 1)
    if len(cores) >= 2:
        assert _probe(0, True, cores=set(cores[:2])) == (True, 2)


@pytest.mark.parametrize(
    "cores, batch_size, expected", [(2, 128, 2), (8, 128, 8), (8, 96, 8), (8, 36, 6), (2, 7, 1)]
)
def test_stochastic_training_splits_the_minibatch_evenly(monkeypatch, cores, batch_size, expected):
    monkeypatch.setattr(distributed, "usable_cores", lambda: cores)
    assert distributed.cpu_devices_for(0, fullbatch=False, batch_size=batch_size) == expected
    assert distributed.cpu_devices_for(0, fullbatch=False) == 1  # no batch size given


def test_requested_count_wins_over_the_cores():
    assert _probe(3, True) == (True, 3)
    assert _probe(3, False) == (True, 3)


def test_the_users_own_choice_is_kept():
    assert _probe(3, True, XLA_FLAGS="--xla_force_host_platform_device_count=5") == (False, 5)
    assert _probe(3, True, JAX_NUM_CPU_DEVICES="2") == (False, 2)


def test_too_late_after_jax_started_changes_nothing():
    assert _probe(3, True, touch_jax_first=True) == (False, 1)


def test_invalid_count_is_rejected():
    with pytest.raises(ValueError, match="at least 1"):
        distributed.configure_cpu_devices(0)
