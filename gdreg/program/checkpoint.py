"""Orbax checkpoints of the training state (:class:`gdreg.program.experiment.TrainState`) in
``WORKDIR/checkpoints/<epoch>/``.

Written by :mod:`gdreg.program.loop`, read back by it on resume and by :mod:`gdreg.tools.landscape`.
A checkpoint is restored replicated over the current mesh, whatever devices and processes wrote
it, so a run can resume on another number of GPUs or nodes.

Paths. Orbax's path library (``etils.epath``) globs inside a checkpoint with the folder's own
name as part of the pattern, so a workdir such as ``runs/lr[0.1]`` made every checkpoint
unreadable (the brackets matched nothing, and orbax skipped merging the per-process files it had
just written); this module makes that folder part literal (:func:`_literal_glob_folders`). A
backslash cannot be made to work: the storage layer (tensorstore) reads it as a directory
separator and writes the files elsewhere, so :func:`check_path` refuses it.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg.engine.mesh import fetch_replicated
from gdreg.engine.signatures import PyTree
from gdreg.program import distributed
from gdreg.program.rundir import CHECKPOINT_DIR, DAMAGED_CHECKPOINT_DIR, RunDirError

if TYPE_CHECKING:
    from gdreg.program.experiment import TrainState

#: The item name orbax's CheckpointManager gives a single saved item: ``<step>/default``.
ITEM_NAME = "default"


def _literal_glob_folders() -> None:
    """Makes ``epath.Path(folder).glob(pattern)`` take ``folder`` literally for local paths.

    epath joins the two and globs the result, so glob characters in the folder's name
    (``[``, ``*``, ``?``) act as a pattern; pathlib, whose API epath follows, globs the pattern
    only. Orbax globs that way for the per-process files it merges after a save and reads back.
    """
    from etils.epath import gpath

    original = gpath._GPath.glob
    if getattr(original, "literal_folder", False):
        return
    magic = re.compile(r"[*?\[]")

    def glob_in_folder(self, pattern: str) -> Iterator:
        if self._uri_scheme is not None or not magic.search(self._path_str):
            yield from original(self, pattern)
            return
        yield from original(type(self)(glob.escape(self._path_str)), pattern)

    glob_in_folder.literal_folder = True
    gpath._GPath.glob = glob_in_folder


_literal_glob_folders()


def check_path(workdir: str) -> None:
    """Raises :class:`RunDirError` for a workdir whose checkpoints would not be where orbax
    reads them: a backslash in its absolute path (see the module docstring)."""
    path = os.path.abspath(workdir)
    if "\\" in path:
        raise RunDirError(
            f"--workdir {path} contains a backslash, which orbax's storage (tensorstore) reads "
            "as a directory separator: its checkpoints would be written elsewhere and never "
            "found; choose a path without '\\'"
        )


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Orbax manager for ``workdir/checkpoints``, keeping the newest ``keep`` checkpoints."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options
    )


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` has a checkpoint directory at all."""
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


class DamagedCheckpointsError(RunDirError):
    """There are checkpoints, but none of them can be read."""


def restore_latest(
    manager: ocp.CheckpointManager,
    template: TrainState,
    mesh: Mesh,
    *,
    first_step: Callable[[int], int] = lambda epoch: epoch,
    move_damaged: bool = True,
    restart_if_damaged: bool = False,
) -> TrainState | None:
    """The newest checkpoint that can be read, shaped like ``template``; None if there is none.

    The arrays are restored replicated over ``mesh``. A checkpoint that cannot be read (a
    damaged file, an empty or unfinished step folder) on any process is reported in one warning
    line and the next older one is tried; every process takes the same decision (a collective
    call). Steps passed over for an older readable one are damaged: with ``move_damaged``
    (process 0 of a run that holds the workdir's lock) they are moved to
    ``WORKDIR/damaged_checkpoints/``, kept and out of the way of new checkpoints of the same step.

    When no step can be read, the cause may as well be the reader (another state structure, a
    full device): :class:`DamagedCheckpointsError` is raised and nothing is moved, unless
    ``restart_if_damaged``, which moves them all aside and returns None (a fresh start).

    Checkpoints written before ``TrainState.ema`` existed are read too (their ``ema`` is the
    template's), and so are those of runs without a penalty written before the penalty state
    was always kept (they hold ``penalty_state = {}``): their penalty state is the template's,
    its step count moved to the restored epoch (``first_step(epoch)`` updates).
    """
    damaged: list[int] = []
    first_reason = ""
    state = None
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            candidate, reason = _restore(manager, step, template, mesh, first_step), ""
        except Exception as error:  # orbax raises many kinds of error for a damaged file
            candidate, reason = None, " ".join(f"{type(error).__name__}: {error}".split())[:200]
        if distributed.all_processes(candidate is not None):
            state = candidate
            break
        logging.warning(
            "checkpoint %d cannot be read (%s); trying an older one",
            step,
            reason or "on another process",
        )
        first_reason = first_reason or reason
        damaged.append(step)
    if state is None and damaged and not restart_if_damaged:
        raise DamagedCheckpointsError(
            f"no checkpoint in {manager.directory} can be read (steps "
            f"{', '.join(map(str, damaged))}; {first_reason or 'on another process'})"
        )
    if state is None and damaged:
        logging.warning(
            "no checkpoint can be read: starting again from epoch 0 (the unreadable ones go to "
            "%s/)",
            DAMAGED_CHECKPOINT_DIR,
        )
    if damaged:
        if move_damaged:
            _move_aside(manager, damaged)
        distributed.all_processes(True)  # the moves are done before any process lists again
        manager.reload()
    return state


def _restore(
    manager: ocp.CheckpointManager,
    step: int,
    template: TrainState,
    mesh: Mesh,
    first_step: Callable[[int], int],
) -> TrainState:
    # Each step is read by a checkpointer of its own: after a failed read (a damaged step) the
    # manager's own restore can refuse every other step too.
    path = os.path.join(os.fspath(manager.directory), str(step), ITEM_NAME)
    # Older layouts, newest first: before TrainState.ema; before the penalty state was kept
    # (an empty dict inside a NamedTuple target does not match orbax's metadata; in a dict it
    # does).
    current = template._asdict()
    without_ema = {key: value for key, value in current.items() if key != "ema"}
    layouts = (template, without_ema, {**without_ema, "penalty_state": {}})
    first_error = None
    with ocp.StandardCheckpointer() as checkpointer:
        for layout in layouts:
            try:
                state = checkpointer.restore(path, _abstract(layout, mesh))
                break
            except Exception as error:  # a damaged file fails every layout: report the first
                first_error = first_error or error
        else:
            raise first_error
    if isinstance(state, type(template)):
        return state
    state = {**current, **state}
    if isinstance(state["penalty_state"], dict):
        epoch = int(fetch_replicated(state["epoch"]))
        count = np.asarray(first_step(epoch), np.int32)
        state["penalty_state"] = template.penalty_state._replace(count=count)
    return type(template)(**state)


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves the step folders ``steps`` to ``WORKDIR/damaged_checkpoints/<step>[.N]``."""
    directory = os.fspath(manager.directory)
    target_root = os.path.join(os.path.dirname(directory), DAMAGED_CHECKPOINT_DIR)
    os.makedirs(target_root, exist_ok=True)
    for step in steps:
        target, copy = os.path.join(target_root, str(step)), 1
        while os.path.exists(target):
            target, copy = os.path.join(target_root, f"{step}.{copy}"), copy + 1
        shutil.move(os.path.join(directory, str(step)), target)


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
