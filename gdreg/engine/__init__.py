"""The engine: the sharded full-batch gradient and what runs it, free of config objects.

Modules: :mod:`.fullbatch` (the exact full-batch gradient, block by block, data-parallel over a
mesh), :mod:`.batchnorm_statistics` (rules for BatchNorm running statistics over a step's
forward passes), :mod:`.train_step` (the compiled training step: full batch, and data-parallel
SGD), :mod:`.evaluate` (sharded test evaluation), :mod:`.loop_shape` (timing the engine's loop
shapes), :mod:`.directions` (filter-normalized random directions), :mod:`.mesh` (the device mesh
and multi-process helpers), :mod:`.signatures` (the function types the engine takes). Pure
functions over pytrees; only :mod:`gdreg.program` reads a config.

The choices of the engine's knobs are declared here, without importing JAX, so that the config
schema can list them.
"""

#: ``train.microbatch_loop``: a Python loop of jitted calls, or one ``lax.scan``.
MICROBATCH_LOOPS = ("python", "scan")
#: ``train.block_loop``: the blocks of a microbatch traced one after another, or batched.
BLOCK_LOOPS = ("unroll", "vmap")
#: ``train.batchnorm_statistics``: the rules of :mod:`.batchnorm_statistics`.
BATCHNORM_RULES = ("reference", "mean", "recompute")
