"""gdreg: full-batch gradient descent with explicit gradient regularization in JAX.

Reimplements Geiping, Goldblum, Pope, Moeller, Goldstein, "Stochastic Training is Not
Necessary for Generalization", ICLR 2022 (arXiv 2109.14119).

The public API is the penalty (:mod:`gdreg.penalty`) and its Flax helpers
(:mod:`gdreg.flax_helpers`); they need only jax, flax and optax. Names are imported on first
use, so that the JAX-free modules (``gdreg.config``, ``gdreg.rundir``, and the report built on
them) load without JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdreg.flax_helpers import PenaltyTrainState, nnx_value_and_penalized_grad
    from gdreg.penalty import (
        GradientNormPenaltyState,
        gradient_norm_penalty,
        hessian_vector_product,
        penalized_gradient,
        value_and_penalized_grad,
    )

_HOMES = {
    "GradientNormPenaltyState": "gdreg.penalty",
    "gradient_norm_penalty": "gdreg.penalty",
    "hessian_vector_product": "gdreg.penalty",
    "penalized_gradient": "gdreg.penalty",
    "value_and_penalized_grad": "gdreg.penalty",
    "PenaltyTrainState": "gdreg.flax_helpers",
    "nnx_value_and_penalized_grad": "gdreg.flax_helpers",
}
__all__ = [
    "GradientNormPenaltyState",
    "PenaltyTrainState",
    "gradient_norm_penalty",
    "hessian_vector_product",
    "nnx_value_and_penalized_grad",
    "penalized_gradient",
    "value_and_penalized_grad",
]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    if name in ("penalty", "flax_helpers"):  # ``import gdreg; gdreg.penalty`` works too
        return importlib.import_module(f"gdreg.{name}")
    raise AttributeError(f"module 'gdreg' has no attribute {name!r}")
