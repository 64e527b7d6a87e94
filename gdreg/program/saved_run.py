"""A finished (or running) run read back from its directory: its config rebuilt, its checkpoint.

For the tools around runs (:mod:`gdreg.tools.landscape`, :mod:`gdreg.tools.precision`): the run
is rebuilt from ``WORKDIR/config.json`` exactly as training built it, and its newest intact
checkpoint is read without moving anything (the run may still be training).
"""

from __future__ import annotations

from gdreg.engine.mesh import fetch_replicated
from gdreg.program import checkpoint, experiment, rundir
from gdreg.program.config import ConfigError
from gdreg.program.rundir import RunDirError


def load_run(workdir: str) -> experiment.Run:
    """The run of ``workdir`` rebuilt from its ``config.json``."""
    config = rundir.read_config(workdir)
    try:
        return experiment.build(config)
    except ConfigError as error:
        raise RunDirError(f"{workdir}: {error}") from None


def load_checkpoint(run: experiment.Run, workdir: str) -> experiment.TrainState:
    """The newest checkpoint of ``workdir`` (host arrays), shaped like the run's state."""
    if not checkpoint.has_checkpoints(workdir):
        raise RunDirError(f"{workdir}: no {rundir.CHECKPOINT_DIR}/ directory, nothing to load")
    manager = checkpoint.checkpoint_manager(workdir, run.config.checkpoint.keep)
    try:
        # Read only: a damaged checkpoint is passed over, never moved (the run may be live).
        state = checkpoint.restore_latest(
            manager,
            experiment.initial_state(run),
            run.mesh,
            first_step=run.plan.first_step,
            move_damaged=False,
        )
    finally:
        manager.close()
    if state is None:
        raise RunDirError(f"{workdir}: {rundir.CHECKPOINT_DIR}/ holds no checkpoint")
    return fetch_replicated(state)
