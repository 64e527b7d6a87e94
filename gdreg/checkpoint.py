"""Orbax checkpoints of the training state in ``WORKDIR/checkpoints/<epoch>/``.

Written by :mod:`gdreg.train`, read back by it on resume and by :mod:`gdreg.landscape`. A
checkpoint is restored replicated over the current mesh, whatever devices and processes wrote
it, so a run can resume on another number of GPUs or nodes.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg.rundir import CHECKPOINT_DIR
from gdreg.types import PyTree


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Orbax manager for ``workdir/checkpoints``, keeping the newest ``keep`` checkpoints."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options
    )


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` has a checkpoint directory at all."""
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


def restore_latest(manager: ocp.CheckpointManager, template: PyTree, mesh: Mesh) -> PyTree | None:
    """The newest checkpoint's state, shaped like ``template``, or None if there is none.

    The arrays are restored replicated over ``mesh``.
    """
    latest = manager.latest_step()
    if latest is None:
        return None
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(
            np.shape(leaf), np.asarray(leaf).dtype, sharding=replicated
        ),
        template,
    )
    return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


def save(manager: ocp.CheckpointManager, epoch: int, state: PyTree) -> None:
    """Saves ``state`` as the checkpoint of ``epoch`` (unless it exists) and waits for it."""
    if manager.latest_step() != epoch:
        manager.save(epoch, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
