"""The gradient-norm penalty for Flax NNX models, whose calls change their own state.

:func:`nnx_value_and_penalized_grad` is :func:`gdreg.value_and_penalized_grad` for an NNX model
(BatchNorm statistics, dropout RNG counters live in the model); Geiping et al., ICLR 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from flax import nnx

from gdreg.penalty.dropin import value_and_penalized_grad

__all__ = ["nnx_value_and_penalized_grad"]


def nnx_value_and_penalized_grad(
    loss_fn: Callable[..., Any],
    *,
    learning_rate: optax.ScalarOrSchedule | None,
    strength: optax.ScalarOrSchedule = 0.5,
    method: str = "forward",
    eps: float = 1e-2,
    has_aux: bool = False,
    axis_name: str | None = None,
    wrt: nnx.filterlib.Filter = nnx.Param,
) -> Callable[..., tuple[Any, nnx.State]]:
    """:func:`gdreg.value_and_penalized_grad` for ``loss_fn(model, *args, **kwargs)`` on NNX.

    The returned ``f(model, *args, step=None, learning_rate=None, **kwargs)`` returns
    ``(value, grads)`` with ``grads`` an ``nnx.State`` of the ``wrt`` variables (ready for
    ``nnx.Optimizer.update(model, grads)``), the gradient of
    ``L + strength * lr / 8 * ||grad L||^2`` (Geiping et al., ICLR 2022). Every evaluation of
    the loss (the gradient and the penalty's perturbed ones) starts from the same snapshot of
    the model's other state, so dropout draws the same masks in all of them and BatchNorm
    normalizes with the same batch; afterwards the model holds the state of the unperturbed
    evaluation only, exactly as after one plain call of ``loss_fn`` (BatchNorm running
    statistics move once, RNG counters advance once).

    Args:
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with
        ``has_aux``), the model in training mode.
      learning_rate, strength, method, eps, has_aux, axis_name: as for
        :func:`gdreg.value_and_penalized_grad`.
      wrt: the NNX filter of the variables to differentiate (``nnx.Param``).

    Returns:
      The function described above.
    """

    def pure_loss(params, graphdef, rest, *args, **kwargs):
        # A fresh model from the snapshot for every evaluation: nothing one evaluation does to
        # the model's state (RNG counters, batch statistics) is seen by the next.
        model = nnx.merge(graphdef, params, rest, copy=True)
        out = loss_fn(model, *args, **kwargs)
        value, aux = out if has_aux else (out, None)
        _, _, new_rest = nnx.split(model, wrt, ...)
        return value, (aux, new_rest)

    penalized = value_and_penalized_grad(
        pure_loss,
        learning_rate=learning_rate,
        strength=strength,
        method=method,
        eps=eps,
        has_aux=True,
        axis_name=axis_name,
    )

    def value_and_grads(model, *args, step=None, learning_rate=None, **kwargs):
        graphdef, params, rest = nnx.split(model, wrt, ...)
        (value, (aux, new_rest)), grads = penalized(
            params, graphdef, rest, *args, step=step, learning_rate=learning_rate, **kwargs
        )
        nnx.update(model, new_rest)
        return ((value, aux) if has_aux else value), grads

    return value_and_grads
