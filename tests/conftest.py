"""Test-session set-up: eight virtual CPU devices, so sharded code runs on a real mesh.

The flag must be set before JAX initializes its backends, i.e. before any test imports jax.
"""

import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests build the same small programs in fresh processes (command-line runs, resumed
# runs): share XLA's compiled executables between them through JAX's persistent cache.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"gdreg-test-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture
def x64():
    """float64 for the duration of one test (float64 references for closed-form checks)."""
    import jax  # after the XLA flags above are set

    # A context manager, so the flag is restored for the other tests whatever happens.
    with jax.enable_x64(True):
        yield
