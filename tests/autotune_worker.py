"""One process of the two-process autotuning test: python autotune_worker.py ID PORT OUT.

Each process has 2 CPU devices; together they form a 4-device mesh over loopback. The timer
is faked differently on each process (another fastest shape, another budget, an out-of-memory
candidate on process 1 only); every process must end with process 0's decisions.
"""

import json

import two_processes

process_id, out = two_processes.join()

import jax  # noqa: E402
import problems  # noqa: E402

from gdreg.engine import loop_shape  # noqa: E402
from gdreg.engine.fullbatch import FullBatchGradient, block_layout  # noqa: E402
from gdreg.engine.loop_shape import LoopShape  # noqa: E402
from gdreg.engine.mesh import data_mesh  # noqa: E402
from gdreg.program import autotune  # noqa: E402

FASTEST = {0: LoopShape(2, "python", "vmap"), 1: LoopShape(1, "scan", "unroll")}[process_id]
OUT_OF_MEMORY = LoopShape(2, "python", "vmap")


def fake_time_shape(engine, arguments, layout, steps):
    shape = LoopShape(engine.blocks_per_microbatch, engine.microbatch_loop, engine.block_loop)
    if process_id == 1 and shape == OUT_OF_MEMORY:
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (fake)")
    return 0.0, 1.0 if shape == FASTEST else 2.0


loop_shape._time_shape = fake_time_shape
engine = FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=data_mesh())
layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)  # 8 blocks, 2 per device
default = LoopShape(1, "python", "unroll")
shapes = loop_shape.candidate_shapes({}, 2, default)
arguments = loop_shape.EngineArguments(None, None, None, None, 0)
# Process 1 alone would time nothing.
budget = 1e9 if process_id == 0 else 0.0
trials = loop_shape.time_loop_shapes(engine, arguments, layout, shapes, budget_seconds=budget)
choice = loop_shape.fastest(trials, default)
read = autotune.Stored(LoopShape(4, "scan", "vmap"), 8, 2) if process_id == 0 else None
stored = autotune._broadcast_stored(read)
with open(out, "w") as handle:
    json.dump(
        {
            "choice": list(choice),
            "stored": [list(stored.shape), stored.devices, stored.processes],
            "table": [trial.describe() for trial in trials],
        },
        handle,
    )
jax.distributed.shutdown()
