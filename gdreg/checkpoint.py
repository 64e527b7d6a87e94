"""Orbax checkpoints of the training state (:class:`gdreg.experiment.TrainState`) in
``WORKDIR/checkpoints/<epoch>/``.

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

from gdreg.experiment import TrainState
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


def restore_latest(
    manager: ocp.CheckpointManager, template: TrainState, mesh: Mesh, *, steps_per_epoch: int = 1
) -> TrainState | None:
    """The newest checkpoint's state, shaped like ``template``, or None if there is none.

    The arrays are restored replicated over ``mesh``. Checkpoints of runs without a penalty
    written before the penalty state was always kept (they hold ``penalty_state = {}``) are
    read too: their penalty state is the template's, its step count moved to the restored
    epoch (``epoch * steps_per_epoch`` updates).
    """
    latest = manager.latest_step()
    if latest is None:
        return None
    try:
        return manager.restore(latest, args=ocp.args.StandardRestore(_abstract(template, mesh)))
    except ValueError as error:
        if "penalty_state" not in str(error):
            raise
    # An empty dict inside a NamedTuple target does not match orbax's metadata; in a dict it does.
    legacy = {**template._asdict(), "penalty_state": {}}
    state = manager.restore(latest, args=ocp.args.StandardRestore(_abstract(legacy, mesh)))
    epoch = int(np.asarray(state["epoch"].addressable_data(0)))
    count = np.asarray(epoch * steps_per_epoch, np.int32)
    return TrainState(**{**state, "penalty_state": template.penalty_state._replace(count=count)})


def _abstract(tree: PyTree, mesh: Mesh) -> PyTree:
    """Shapes and dtypes of ``tree``'s leaves, to be restored replicated over ``mesh``."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(
            np.shape(leaf), np.asarray(leaf).dtype, sharding=replicated
        ),
        tree,
    )


def save(manager: ocp.CheckpointManager, epoch: int, state: PyTree) -> None:
    """Saves ``state`` as the checkpoint of ``epoch`` (unless it exists) and waits for it."""
    if manager.latest_step() != epoch:
        manager.save(epoch, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
