"""The explicit gradient-norm penalty: what other projects install and import (jax, flax, optax).

Geiping, Goldblum, Pope, Moeller & Goldstein, "Stochastic Training is Not Necessary for
Generalization" (ICLR 2022, arXiv 2109.14119): the gradient of
``L + strength * lr / 8 * ||grad L||^2`` on a batch, from a Hessian-vector product computed by
finite differences or exactly. Public pieces, from the safest to the most flexible:

* :func:`value_and_penalized_grad` (:mod:`.dropin`): wraps a loss like ``jax.value_and_grad``;
* :func:`nnx_value_and_penalized_grad` (:mod:`.nnx`): the same for Flax NNX models;
* :func:`with_penalized_gradient` (:mod:`.dropin`): a loss whose gradient is the penalized one,
  for code that differentiates a loss itself (Flax's ``DynamicScale``);
* :func:`gradient_norm_penalty` (:mod:`.transform`): an optax transformation that must come
  first in a chain and be given ``penalty_grad_fn`` (it checks that at the first update);
  :class:`PenaltyTrainState` (:mod:`.linen`) passes that argument through a Flax Linen
  ``TrainState``;
* :func:`penalized_gradient` and :func:`hessian_vector_product` (:mod:`.hessian`): the math.

Names are imported on first use, so that reading :data:`METHODS` (the training program's config
schema does) loads no JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdreg.penalty.dropin import value_and_penalized_grad, with_penalized_gradient
    from gdreg.penalty.hessian import hessian_vector_product, penalized_gradient
    from gdreg.penalty.linen import PenaltyTrainState
    from gdreg.penalty.nnx import nnx_value_and_penalized_grad
    from gdreg.penalty.transform import GradientNormPenaltyState, gradient_norm_penalty

#: Ways to compute the Hessian-vector product, see :func:`hessian_vector_product`.
METHODS: tuple[str, ...] = ("forward", "central", "jvp")

_HOMES = {
    "hessian_vector_product": "hessian",
    "penalized_gradient": "hessian",
    "value_and_penalized_grad": "dropin",
    "with_penalized_gradient": "dropin",
    "GradientNormPenaltyState": "transform",
    "gradient_norm_penalty": "transform",
    "PenaltyTrainState": "linen",
    "nnx_value_and_penalized_grad": "nnx",
}
__all__ = [
    "METHODS",
    "GradientNormPenaltyState",
    "PenaltyTrainState",
    "gradient_norm_penalty",
    "hessian_vector_product",
    "nnx_value_and_penalized_grad",
    "penalized_gradient",
    "value_and_penalized_grad",
    "with_penalized_gradient",
]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"gdreg.penalty.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'gdreg.penalty' has no attribute {name!r}")
