"""Type aliases shared across gdreg (pytrees, the engine's and evaluator's functions, dtypes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

#: A nested structure of arrays (parameters, gradients, optimizer state, ...).
PyTree = Any

#: ``loss_fn(params, model_state, inputs, labels) -> (mean loss, (batch_statistics, aux))``,
#: with ``batch_statistics`` shaped like ``model_state``: this pass's BatchNorm statistics
#: (mean and unbiased variance; :mod:`gdreg.engine.running_statistics` makes running averages of
#: them), and ``aux["accuracy"]`` the fraction of correct predictions.
LossFn = Callable[[PyTree, PyTree, jax.Array, jax.Array], tuple[jax.Array, tuple[PyTree, dict]]]

#: ``batch_fn(data, indices, step) -> (inputs, labels)`` of the images ``indices`` of ``data``.
BatchFn = Callable[[PyTree, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

#: A dtype or its name (``jnp.float32``, ``"bfloat16"``).
Dtype = Any

#: ``predict_fn(params, model_state, inputs) -> logits`` in evaluation mode.
PredictFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]
