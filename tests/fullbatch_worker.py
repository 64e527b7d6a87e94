"""One process of the two-process full-batch test: python fullbatch_worker.py ID PORT OUT.

Each process has 2 CPU devices; together they form a 4-device mesh over loopback.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
)
sys.path.insert(0, os.path.dirname(__file__))
import problems  # noqa: E402

from gdreg import gradient_norm_penalty  # noqa: E402
from gdreg.fullbatch import FullBatchGradient, block_layout  # noqa: E402
from gdreg.sharding import data_mesh, fetch_replicated, replicate  # noqa: E402

assert jax.device_count() == 4, jax.devices()
mesh = data_mesh()
params, model_state = problems.init()
penalty = gradient_norm_penalty(strength=0.5, learning_rate=0.1)
engine = FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=mesh, penalty=penalty)
result = engine(
    replicate(params, mesh),
    replicate(model_state, mesh),
    replicate(penalty.init(params), mesh),
    replicate(problems.dataset(), mesh),
    block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE),
    0,
)
flat, _ = ravel_pytree(fetch_replicated(result.grads))
metrics = fetch_replicated(result.metrics)
np.savez(out, grads=flat, **metrics)
jax.distributed.shutdown()
