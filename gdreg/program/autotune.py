"""A run that measures itself: the engine's loop shape, chosen before training and kept.

The candidates and their timing are :mod:`gdreg.engine.loop_shape`'s; this module decides per
``train.autotune`` whether to time: ``"auto"`` times on GPUs and TPUs and takes the defaults on
CPU, where the best shape is known (one block per Python call: XLA:CPU runs convolutions inside
loop bodies on a slow path); ``"on"`` always times; ``"off"`` takes the defaults. Fields set in
the config (``train.blocks_per_microbatch`` > 0, ``train.microbatch_loop`` and
``train.block_loop`` not empty) are fixed, and only the others are tuned; with all three set
nothing is timed. The table goes to the log, one line per candidate, and the fastest shape is
chosen (compile time excluded), trying new candidates only while the budget
``train.autotune_seconds`` lasts; the default shape
(:func:`gdreg.program.experiment.loop_settings`) is timed first.

Resuming: the summation order depends on the shape, so a resumed run must use the one it
started with to repeat the uninterrupted run bit for bit. :func:`choose_loop_shape` stores the
shape in ``WORKDIR/loop_shape.json`` (:func:`gdreg.program.rundir.write_loop_shape`) before the
first step and reuses it without timing; explicit config fields still win over a stored value
(with a warning, and the file then records the new shape). A run resumed from a checkpoint
written before this file existed keeps the default shape it trained with. On several processes
the stored shape and the choice are process 0's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import ml_collections

from gdreg.engine import BLOCK_LOOPS, MICROBATCH_LOOPS
from gdreg.engine.loop_shape import (
    EngineArguments,
    LoopShape,
    Trial,
    candidate_shapes,
    fastest,
    time_loop_shapes,
)
from gdreg.engine.mesh import fetch_replicated, from_process_zero
from gdreg.program import distributed, rundir
from gdreg.program.rundir import RunDirError

if TYPE_CHECKING:
    from gdreg.program.experiment import Run, TrainState

# ----- the candidates ---------------------------------------------------------------------


def explicit_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The loop knobs the config sets (0 and "" leave a knob to the tuner)."""
    train = config.train
    fixed = {
        "blocks_per_microbatch": train.blocks_per_microbatch,
        "microbatch_loop": train.microbatch_loop,
        "block_loop": train.block_loop,
    }
    return {field: value for field, value in fixed.items() if value}


def _fixed(run: Run) -> dict[str, Any]:
    """:func:`explicit_fields`, blocks per microbatch cut to the run's blocks per device (the
    engine was built so, with a warning, :func:`gdreg.program.experiment.loop_settings`)."""
    fixed = explicit_fields(run.config)
    if "blocks_per_microbatch" in fixed:
        fixed["blocks_per_microbatch"] = min(
            fixed["blocks_per_microbatch"], run.blocks_per_device()
        )
    return fixed


def built_shape(run: Run) -> LoopShape:
    """The shape the run's engine was built in: the config's fields, else the backend's
    defaults (:func:`gdreg.program.experiment.loop_settings`)."""
    engine = run.engine
    return LoopShape(engine.blocks_per_microbatch, engine.microbatch_loop, engine.block_loop)


# ----- the run ------------------------------------------------------------------------------


def _times(mode: str) -> bool:
    return mode == "on" or (mode == "auto" and jax.default_backend() != "cpu")


def tune(run: Run, state: TrainState, *, mode: str | None = None) -> tuple[LoopShape, list[Trial]]:
    """The loop shape for ``run`` (``state``: replicated on its mesh) and the timing table.

    ``mode`` overrides ``train.autotune``. Without timing (``off``, ``auto`` on CPU, or a
    single candidate) the table is empty; the candidates are timed on the layout of the
    state's epoch, at the state's parameters, within ``train.autotune_seconds``.
    """
    config = run.config
    mode = config.train.autotune if mode is None else mode
    default = built_shape(run)
    if not _times(mode):
        return default, []
    epoch = int(fetch_replicated(state.epoch))
    layout = run.epoch_layouts(epoch)[0]
    num_devices = run.engine.num_devices
    shapes = candidate_shapes(_fixed(run), math.ceil(len(layout) / num_devices), default)
    if len(shapes) == 1:
        return shapes[0], []
    arguments = EngineArguments(
        state.params, state.model_state, state.penalty_state, run.train_data, epoch
    )
    trials = time_loop_shapes(
        run.engine, arguments, layout, shapes, budget_seconds=config.train.autotune_seconds
    )
    return fastest(trials, default), trials


def with_loop_shape(run: Run, shape: LoopShape) -> Run:
    """``run`` with its engines (training and BatchNorm statistics) rebuilt in ``shape``."""
    if built_shape(run) == shape:
        return run
    engine = run.engine
    settings = shape._asdict()
    statistics_engine = run.statistics_engine
    if statistics_engine is not None:
        statistics_engine = statistics_engine.replace(**settings)
    return dataclasses.replace(
        run, engine=engine.replace(**settings), statistics_engine=statistics_engine
    )


class Stored(NamedTuple):
    """What ``loop_shape.json`` holds: the shape and where it ran (0: not recorded)."""

    shape: LoopShape
    devices: int
    processes: int


def _count(values: Mapping[str, Any], field: str) -> int:
    value = values.get(field)
    return value if type(value) is int and value > 0 else 0


def _stored(workdir: str) -> Stored | None:
    """The contents of ``workdir``'s loop_shape.json (None without one), checked; a damaged file
    is a :class:`RunDirError` that says how to go on."""
    try:
        values = rundir.read_loop_shape(workdir)
        if values is None:
            return None
        shape = LoopShape(**{field: values[field] for field in LoopShape._fields})
        if shape.microbatch_loop not in MICROBATCH_LOOPS or shape.block_loop not in BLOCK_LOOPS:
            raise RunDirError(
                f"{rundir.loop_shape_path(workdir)}: unknown loop kinds in "
                f"{dict(shape._asdict())}; microbatch_loop is one of {MICROBATCH_LOOPS}, "
                f"block_loop one of {BLOCK_LOOPS}"
            )
    except RunDirError as error:
        raise RunDirError(
            f"{error}; set train.blocks_per_microbatch, train.microbatch_loop and "
            "train.block_loop to the shape the run trained with, or delete the file to choose "
            "again (the resumed run may then differ from an uninterrupted one in float32 "
            "rounding)"
        ) from None
    return Stored(shape, _count(values, "devices"), _count(values, "processes"))


def _broadcast_stored(stored: Stored | None) -> Stored | None:
    """Process 0's ``stored`` (or its None) on every process."""
    if jax.process_count() == 1:
        return stored
    code = [0, 0, 0, 0, 0, 0]
    if stored is not None:
        shape = stored.shape
        code = [
            1,
            shape.blocks_per_microbatch,
            MICROBATCH_LOOPS.index(shape.microbatch_loop),
            BLOCK_LOOPS.index(shape.block_loop),
            stored.devices,
            stored.processes,
        ]
    present, size, loop, inner, devices, processes = from_process_zero(code)
    if not present:
        return None
    return Stored(LoopShape(size, MICROBATCH_LOOPS[loop], BLOCK_LOOPS[inner]), devices, processes)


def _read_stored(workdir: str, fixed: Mapping[str, Any]) -> Stored | None:
    """Process 0's reading of the stored shape, on every process (a collective call).

    A damaged file ends the run on every process, unless the config sets all three fields
    (then the file is only rewritten).
    """
    stored, problem = None, None
    if jax.process_index() == 0:
        try:
            stored = _stored(workdir)
        except RunDirError as error:
            if len(fixed) < len(LoopShape._fields):
                problem = error
            else:
                logging.warning("%s; the config sets every loop field, so it is rewritten", error)
    if not distributed.all_processes(problem is None):
        raise problem or RunDirError(f"{rundir.loop_shape_path(workdir)}: unreadable")
    return _broadcast_stored(stored)


def _processes(count: int) -> str:
    return f"{count} process{'es' if count > 1 else ''}"


def choose_loop_shape(run: Run, state: TrainState, workdir: str) -> Run:
    """``run`` with its engine in the loop shape it trains with, stored in ``workdir``.

    The shape stored in ``WORKDIR/loop_shape.json`` if there is one (its fields set in the
    config replaced by the config's values, with a warning); else the default shape for a run
    resumed from a checkpoint written before shapes were stored; else :func:`tune`'s choice
    (which times per ``train.autotune``); blocks per microbatch at most
    :meth:`Run.blocks_per_device`. Process 0 writes the file whenever the shape, or the number
    of devices or processes, differs from what it holds. ``state``: the restored state,
    replicated on the run's mesh.
    """
    fixed = _fixed(run)
    stored = _read_stored(workdir, fixed)
    path = rundir.loop_shape_path(workdir)
    epoch = int(fetch_replicated(state.epoch))
    devices, processes = run.engine.num_devices, jax.process_count()
    trials: list[Trial] = []
    if stored is not None:
        shape = stored.shape._replace(**fixed)
        if shape != stored.shape:
            logging.warning(
                "the config's loop settings replace those stored in %s (%s -> %s); the float32 "
                "sums change order, so the run no longer repeats an uninterrupted one bit for bit",
                path,
                stored.shape,
                shape,
            )
        else:
            logging.info("loop shape %s, as stored in %s", shape, path)
        bound = run.blocks_per_device()
        if shape.blocks_per_microbatch > bound:  # a hand-edited file, or now more devices
            logging.warning(
                "%s: blocks_per_microbatch=%d is more than the %d block%s each device has per "
                "epoch; using %d",
                path,
                shape.blocks_per_microbatch,
                bound,
                "" if bound == 1 else "s",
                bound,
            )
            shape = shape._replace(blocks_per_microbatch=bound)
        before = stored.processes or processes  # not recorded by older versions
        if epoch > 0 and stored.devices and (stored.devices, before) != (devices, processes):
            logging.warning(
                "resuming on %d devices in %s after training on %d in %s: the float32 sums "
                "change order, so the metrics may differ from an uninterrupted run's in the last "
                "digits",
                devices,
                _processes(processes),
                stored.devices,
                _processes(before),
            )
    elif epoch > 0:
        shape = built_shape(run)
        logging.info("loop shape %s: the default, which the resumed run trained with", shape)
    else:
        shape, trials = tune(run, state)
        for trial in trials:
            logging.info("loop shape timing: %s", trial.describe())
        logging.info("loop shape %s (%s)", shape, "the fastest timed" if trials else "not timed")
    if jax.process_index() == 0 and Stored(shape, devices, processes) != stored:
        timing = [trial.describe() for trial in trials]
        if stored is not None and shape == stored.shape:  # only the devices changed
            with contextlib.suppress(RunDirError):
                timing = (rundir.read_loop_shape(workdir) or {}).get("timing", timing)
        rundir.write_loop_shape(
            workdir,
            {
                **shape._asdict(),
                "devices": devices,
                "processes": processes,
                "device_kind": jax.devices()[0].device_kind,
                "timing": timing,
            },
        )
    return with_loop_shape(run, shape)
