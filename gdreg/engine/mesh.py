"""Device placement over the one-axis ``data`` mesh, shared by the engine and the evaluator.

All data parallelism in gdreg is over one mesh axis, :data:`DATA_AXIS`. Host arrays are
either replicated on every device (parameters, the uint8 training set) or split by rows over
the axis (block layouts). Work that does not divide evenly is padded with zero-weight rows:
the padded entries are computed like any other and multiplied by weight 0, so every device
runs the same program and the padding changes no sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from gdreg.engine.signatures import PyTree


DATA_AXIS = "data"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places a pytree of host arrays on every device of ``mesh`` (also across processes).

    Every process must pass the same values; each one fills only its own devices, so this works
    unchanged under ``jax.distributed``.
    """
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_rows(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """Splits a host array (identical on every process) along axis 0 over the ``data`` axis."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fetch_replicated(tree: PyTree) -> PyTree:
    """Copies a pytree of replicated arrays to the host as numpy (also across processes).

    Under ``jax.distributed`` a replicated array spans devices of other processes and cannot be
    read whole; every process reads its own first copy instead.
    """

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)


def pad_with_zero_weights(rows: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``rows`` along axis 0 to a multiple of ``unit`` rows, with weights marking real rows.

    Returns ``(padded, weights)``: ``padded[:n] == rows`` and zeros after, ``weights`` float32
    ``[len(padded)]`` with 1 for the ``n`` real rows and 0 for the padding. With ``unit`` the
    number of devices times the rows each device takes per call, every device gets the same
    number of calls.
    """
    rows = np.asarray(rows)
    if unit < 1:
        raise ValueError(f"unit must be at least 1, got {unit}")
    count = rows.shape[0]
    padded_count = math.ceil(count / unit) * unit
    padded = np.zeros((padded_count, *rows.shape[1:]), rows.dtype)
    padded[:count] = rows
    weights = np.zeros((padded_count,), np.float32)
    weights[:count] = 1.0
    return padded, weights


def from_process_zero(values: Sequence[int]) -> list[int]:
    """Process 0's ``values`` on every process (a collective call where there are several)."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    array = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int64))
    return [int(value) for value in np.asarray(array)]
