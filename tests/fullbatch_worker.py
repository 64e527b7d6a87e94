"""One process of the two-process full-batch test: python fullbatch_worker.py ID PORT OUT.

Each process has 2 CPU devices; together they form a 4-device mesh over loopback.
"""

import two_processes

_, out = two_processes.join()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import problems  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from gdreg import gradient_norm_penalty  # noqa: E402
from gdreg.engine.fullbatch import FullBatchGradient, block_layout  # noqa: E402
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate  # noqa: E402

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
