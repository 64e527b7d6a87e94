"""A step that measures itself: the engine's loop shape, timed on the run before it trains.

:class:`gdreg.fullbatch.FullBatchGradient` walks each device's blocks in microbatches, shaped by
three knobs that change only the speed and the order of the float32 sums: how many blocks one
compiled call takes (``blocks_per_microbatch``), whether the microbatches are a Python loop of
jitted calls or one ``lax.scan`` (``microbatch_loop``), and whether the blocks of a microbatch
are traced one after another or batched (``block_loop``). The fastest shape depends on the
device, the model, the block size, the dtype and the penalty, so :func:`tune` times the
candidates on the run itself: blocks per microbatch in :data:`BLOCKS_PER_MICROBATCH` (those
that do not exceed the blocks per device), each loop kind, for a few steps each after the
compiling one, on the first ``2 x (largest candidate) x devices`` blocks of the step's layout,
scaled to the whole layout by the number of microbatch calls. Shapes that compute the same
program are timed once (a "vmap" over one block is the "unroll" of one block; a "scan" over
one microbatch is one Python call). The table goes to the log, one line per candidate, and
the fastest shape is chosen (compile time excluded), trying new candidates only while the
budget ``train.autotune_seconds`` lasts; the default shape
(:func:`gdreg.experiment.loop_settings`) is timed first, and a candidate that runs out of
device memory is skipped.

``train.autotune``: ``"auto"`` times on GPUs and TPUs and takes the defaults on CPU, where the
best shape is known (one block per Python call: XLA:CPU runs convolutions inside loop bodies on
a slow path); ``"on"`` always times; ``"off"`` takes the defaults. Fields set in the config
(``train.blocks_per_microbatch`` > 0, ``train.microbatch_loop`` and ``train.block_loop`` not
empty) are fixed, and only the others are tuned; with all three set nothing is timed.

Resuming: the summation order depends on the shape, so a resumed run must use the one it
started with to repeat the uninterrupted run bit for bit. :func:`choose_loop_shape` stores the
shape in ``WORKDIR/loop_shape.json`` (:func:`gdreg.rundir.write_loop_shape`) before the first
step and reuses it without timing; explicit config fields still win over a stored value (with
a warning, and the file then records the new shape). A run resumed from a checkpoint written
before this file existed keeps the default shape it trained with.

Several processes: the engine is sharded over all of them, so every process takes part in
every timed call; whether to try the next candidate, whether one was skipped and the choice
itself are process 0's, broadcast to the others, so that all take the same path and the same
shape.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from gdreg import distributed, rundir
from gdreg.experiment import Run, TrainState, epoch_layouts, loop_settings
from gdreg.fullbatch import BLOCK_LOOPS, MICROBATCH_LOOPS, FullBatchGradient
from gdreg.rundir import RunDirError
from gdreg.sharding import fetch_replicated
from gdreg.types import PyTree

AUTOTUNE_MODES = ("auto", "on", "off")
#: Blocks per compiled call that are tried (those above the blocks per device are left out).
BLOCKS_PER_MICROBATCH = (1, 2, 4, 8, 16)
#: Timed steps per candidate, after the compiling one; the fastest counts.
TIMED_STEPS = 2
#: Microbatch calls per device of the largest candidate in the timed layout (a scan of 2).
PROBE_MICROBATCHES = 2


class LoopShape(NamedTuple):
    """The engine's loop knobs (constructor arguments of :class:`FullBatchGradient`)."""

    blocks_per_microbatch: int
    microbatch_loop: str
    block_loop: str

    def __str__(self) -> str:
        return " ".join(f"{field}={value}" for field, value in self._asdict().items())


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate of the table: its time per full step, or why it has none."""

    shape: LoopShape
    seconds_per_step: float | None = None  # one full-batch gradient evaluation, compile excluded
    compile_seconds: float | None = None  # the first call less a timed one
    skipped: str | None = None  # "out of memory", "budget spent"

    def describe(self) -> str:
        """One line of the table: ``SHAPE seconds_per_step=... compile_s=...`` or ``skipped=``."""
        if self.skipped is not None:
            return f"{self.shape} skipped={self.skipped.replace(' ', '_')}"
        return (
            f"{self.shape} seconds_per_step={self.seconds_per_step:.4g} "
            f"compile_s={self.compile_seconds:.2f}"
        )


class EngineArguments(NamedTuple):
    """What the engine is called with, except the layout (all replicated on its mesh)."""

    params: PyTree
    model_state: PyTree
    penalty_state: PyTree
    data: PyTree
    step: int


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


def default_shape(config: ml_collections.ConfigDict) -> LoopShape:
    """The shape without timing: the config's fields, else the backend's defaults."""
    return LoopShape(**loop_settings(config))


def candidate_shapes(
    fixed: Mapping[str, Any], blocks_per_device: int, default: LoopShape
) -> list[LoopShape]:
    """The shapes to time: every combination of the knobs not in ``fixed``, ``default`` first.

    Blocks per microbatch from :data:`BLOCKS_PER_MICROBATCH` up to ``blocks_per_device``
    (at least 1); "vmap" only with more than one block per microbatch and "scan" only with more
    than one microbatch per device (otherwise they compute what "unroll" and "python" do).
    """
    blocks_per_device = max(1, blocks_per_device)
    if "blocks_per_microbatch" in fixed:
        sizes = [fixed["blocks_per_microbatch"]]
    else:
        sizes = [size for size in BLOCKS_PER_MICROBATCH if size <= blocks_per_device]
    shapes = []
    for size in sizes:
        microbatches = math.ceil(blocks_per_device / size)
        loops = [fixed["microbatch_loop"]] if "microbatch_loop" in fixed else None
        loops = loops or (list(MICROBATCH_LOOPS) if microbatches > 1 else ["python"])
        block_loops = [fixed["block_loop"]] if "block_loop" in fixed else None
        block_loops = block_loops or (list(BLOCK_LOOPS) if size > 1 else ["unroll"])
        shapes += [LoopShape(size, loop, inner) for loop in loops for inner in block_loops]
    if default in shapes:
        shapes.remove(default)
        shapes.insert(0, default)
    return shapes


def microbatch_calls(num_blocks: int, num_devices: int, blocks_per_microbatch: int) -> int:
    """Microbatches each device runs for ``num_blocks`` blocks (padding included)."""
    return math.ceil(num_blocks / (num_devices * blocks_per_microbatch))


def probe_layout(layout: np.ndarray, num_devices: int, shapes: Sequence[LoopShape]) -> np.ndarray:
    """The first blocks of ``layout``: :data:`PROBE_MICROBATCHES` microbatches per device of the
    largest candidate (the whole layout if it is smaller)."""
    largest = max(shape.blocks_per_microbatch for shape in shapes)
    return layout[: num_devices * largest * PROBE_MICROBATCHES]


# ----- timing -----------------------------------------------------------------------------


def _out_of_memory(error: Exception) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def _from_process_zero(values: Sequence[int]) -> list[int]:
    """Process 0's ``values`` on every process (a collective call where there are several)."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    array = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int64))
    return [int(value) for value in np.asarray(array)]


def _time_shape(
    engine: FullBatchGradient, arguments: EngineArguments, layout: np.ndarray, steps: int
) -> tuple[float, float]:
    """(compile seconds, seconds of the fastest of ``steps`` calls) of ``engine`` on ``layout``."""
    params, model_state, penalty_state, data, step = arguments

    def call() -> float:
        start = time.perf_counter()
        result = engine(params, model_state, penalty_state, data, layout, step)
        jax.block_until_ready(result)
        return time.perf_counter() - start

    first = call()
    fastest = min(call() for _ in range(steps))
    return max(first - fastest, 0.0), fastest


def time_loop_shapes(
    engine: FullBatchGradient,
    arguments: EngineArguments,
    layout: np.ndarray,
    shapes: Sequence[LoopShape],
    *,
    budget_seconds: float,
    steps: int = TIMED_STEPS,
) -> list[Trial]:
    """Times ``engine`` rebuilt with each of ``shapes`` on a prefix of ``layout``.

    Each candidate compiles, then runs ``steps`` timed calls on :func:`probe_layout`; its
    seconds per evaluation of the whole ``layout`` are the fastest call times the ratio of
    microbatch calls per device (:func:`microbatch_calls`) of ``layout`` to the probe's. New
    candidates are started while less than ``budget_seconds`` have passed; one that runs out
    of device memory (XLA's RESOURCE_EXHAUSTED) is skipped. A collective call on several
    processes: process 0 decides whether to go on and whether a candidate was skipped.
    """
    num_devices = engine.num_devices
    probe = probe_layout(layout, num_devices, shapes)
    start = time.perf_counter()
    trials = []
    for shape in shapes:
        (go,) = _from_process_zero([time.perf_counter() - start < budget_seconds])
        if not go:
            trials.append(Trial(shape, skipped="budget spent"))
            continue
        try:
            compile_seconds, seconds = _time_shape(
                engine.replace(**shape._asdict()), arguments, probe, steps
            )
        except Exception as error:  # only running out of memory skips a candidate
            if not _out_of_memory(error):
                raise
            trial = Trial(shape, skipped="out of memory")
        else:
            scale = microbatch_calls(len(layout), num_devices, shape.blocks_per_microbatch)
            scale /= microbatch_calls(len(probe), num_devices, shape.blocks_per_microbatch)
            trial = Trial(shape, seconds * scale, compile_seconds)
        gc.collect()  # the candidate's compiled programs and buffers (engines hold cycles)
        (ran,) = _from_process_zero([trial.skipped is None])
        if not ran and trial.skipped is None:
            trial = Trial(shape, skipped="out of memory on process 0")
        trials.append(trial)
    return trials


def fastest(trials: Sequence[Trial], default: LoopShape) -> LoopShape:
    """The timed shape with the fewest seconds per step (``default`` when none was timed);
    process 0's choice on every process."""
    timed = [i for i, trial in enumerate(trials) if trial.seconds_per_step is not None]
    best = min(timed, key=lambda i: trials[i].seconds_per_step, default=-1)
    (best,) = _from_process_zero([best])
    return default if best < 0 else trials[best].shape


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
    default = default_shape(config)
    if not _times(mode):
        return default, []
    epoch = int(fetch_replicated(state.epoch))
    layout = epoch_layouts(run, epoch)[0]
    num_devices = run.engine.num_devices
    shapes = candidate_shapes(
        explicit_fields(config), math.ceil(len(layout) / num_devices), default
    )
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
    engine = run.engine
    if LoopShape(engine.blocks_per_microbatch, engine.microbatch_loop, engine.block_loop) == shape:
        return run
    settings = shape._asdict()
    statistics_engine = run.statistics_engine
    if statistics_engine is not None:
        statistics_engine = statistics_engine.replace(**settings)
    return dataclasses.replace(
        run, engine=engine.replace(**settings), statistics_engine=statistics_engine
    )


def _stored(workdir: str) -> LoopShape | None:
    """The shape in ``workdir``'s loop_shape.json (None without one), checked; a damaged file
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
    return shape


def _broadcast_shape(shape: LoopShape | None) -> LoopShape | None:
    """Process 0's ``shape`` (or its None) on every process."""
    if jax.process_count() == 1:
        return shape
    code = [0, 0, 0, 0]
    if shape is not None:
        code = [
            1,
            shape.blocks_per_microbatch,
            MICROBATCH_LOOPS.index(shape.microbatch_loop),
            BLOCK_LOOPS.index(shape.block_loop),
        ]
    present, size, loop, inner = _from_process_zero(code)
    return LoopShape(size, MICROBATCH_LOOPS[loop], BLOCK_LOOPS[inner]) if present else None


def _read_stored(workdir: str, fixed: Mapping[str, Any]) -> LoopShape | None:
    """Process 0's reading of the stored shape, on every process (a collective call).

    A damaged file ends the run on every process, unless the config sets all three fields
    (then the file is only rewritten).
    """
    shape, problem = None, None
    if jax.process_index() == 0:
        try:
            shape = _stored(workdir)
        except RunDirError as error:
            if len(fixed) < len(LoopShape._fields):
                problem = error
            else:
                logging.warning("%s; the config sets every loop field, so it is rewritten", error)
    if not distributed.all_processes(problem is None):
        raise problem or RunDirError(f"{rundir.loop_shape_path(workdir)}: unreadable")
    return _broadcast_shape(shape)


def choose_loop_shape(run: Run, state: TrainState, workdir: str) -> Run:
    """``run`` with its engine in the loop shape it trains with, stored in ``workdir``.

    The shape stored in ``WORKDIR/loop_shape.json`` if there is one (its fields set in the
    config replaced by the config's values, with a warning); else the default shape for a run
    resumed from a checkpoint written before shapes were stored; else :func:`tune`'s choice
    (which times per ``train.autotune``). Process 0 writes the file whenever the shape differs
    from what it holds. ``state``: the restored state, replicated on the run's mesh.
    """
    config = run.config
    fixed = explicit_fields(config)
    stored = _read_stored(workdir, fixed)
    path = rundir.loop_shape_path(workdir)
    trials: list[Trial] = []
    if stored is not None:
        shape = stored._replace(**fixed)
        if shape != stored:
            logging.warning(
                "the config's loop settings replace those stored in %s (%s -> %s); the float32 "
                "sums change order, so the run no longer repeats an uninterrupted one bit for bit",
                path,
                stored,
                shape,
            )
        else:
            logging.info("loop shape %s, as stored in %s", shape, path)
    elif int(fetch_replicated(state.epoch)) > 0:
        shape = default_shape(config)
        logging.info("loop shape %s: the default, which the resumed run trained with", shape)
    else:
        shape, trials = tune(run, state)
        for trial in trials:
            logging.info("loop shape timing: %s", trial.describe())
        logging.info("loop shape %s (%s)", shape, "the fastest timed" if trials else "not timed")
    if jax.process_index() == 0 and shape != stored:
        rundir.write_loop_shape(
            workdir,
            {
                **shape._asdict(),
                "devices": run.engine.num_devices,
                "device_kind": jax.devices()[0].device_kind,
                "timing": [trial.describe() for trial in trials],
            },
        )
    return with_loop_shape(run, shape)
