"""The engine's loop shape: the candidates, and timing them on the engine itself.

:class:`gdreg.engine.fullbatch.FullBatchGradient` walks each device's blocks in microbatches,
shaped by three knobs that change only the speed and the order of the float32 sums: how many
blocks one compiled call takes (``blocks_per_microbatch``), whether the microbatches are a Python
loop of jitted calls or one ``lax.scan`` (``microbatch_loop``), and whether the blocks of a
microbatch are traced one after another or batched (``block_loop``). The fastest shape depends on
the device, the model, the block size, the dtype and the penalty, so :func:`time_loop_shapes`
times the candidates (:func:`candidate_shapes`) on the engine itself: for a few steps each after
the compiling one, on the first ``2 x (largest candidate) x devices`` blocks of the step's
layout, scaled to the whole layout by the number of microbatch calls. Shapes that compute the
same program are timed once (a "vmap" over one block is the "unroll" of one block; a "scan" over
one microbatch is one Python call); a candidate that runs out of device memory is skipped.
:mod:`gdreg.program.autotune` decides when to time and stores the choice with the run.

Several processes: the engine is sharded over all of them, so every process takes part in every
timed call; whether to try the next candidate, whether one was skipped and the choice itself are
process 0's (:func:`gdreg.engine.mesh.from_process_zero`), so that all take the same path.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from gdreg.engine import BLOCK_LOOPS, MICROBATCH_LOOPS
from gdreg.engine.fullbatch import FullBatchGradient
from gdreg.engine.mesh import from_process_zero
from gdreg.engine.signatures import PyTree

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
        (go,) = from_process_zero([time.perf_counter() - start < budget_seconds])
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
        (ran,) = from_process_zero([trial.skipped is None])
        if not ran and trial.skipped is None:
            trial = Trial(shape, skipped="out of memory on process 0")
        trials.append(trial)
    return trials


def fastest(trials: Sequence[Trial], default: LoopShape) -> LoopShape:
    """The timed shape with the fewest seconds per step (``default`` when none was timed);
    process 0's choice on every process."""
    timed = [i for i, trial in enumerate(trials) if trial.seconds_per_step is not None]
    best = min(timed, key=lambda i: trials[i].seconds_per_step, default=-1)
    (best,) = from_process_zero([best])
    return default if best < 0 else trials[best].shape
