"""The gradient-norm penalty in Flax training loops: Linen ``TrainState`` and NNX models.

Two pieces that Flax's own plumbing lacks (Geiping et al., ICLR 2022, for the penalty itself;
see :mod:`gdreg.penalty`):

* :class:`PenaltyTrainState`: a ``flax.training.train_state.TrainState`` whose
  ``apply_gradients`` forwards extra keyword arguments (such as ``penalty_grad_fn``) to the
  optax chain, for the :func:`gdreg.gradient_norm_penalty` transform.
* :func:`nnx_value_and_penalized_grad`: :func:`gdreg.value_and_penalized_grad` for an NNX model
  whose call changes its own state (BatchNorm statistics, dropout RNG counters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax
from flax import nnx
from flax.training import train_state

from gdreg.penalty import value_and_penalized_grad

__all__ = ["PenaltyTrainState", "nnx_value_and_penalized_grad"]


def _with_update_args(
    tx: optax.GradientTransformation, update_args: dict[str, Any]
) -> optax.GradientTransformation:
    """``tx`` with ``update_args`` bound as keyword arguments of every ``update`` call."""
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None):
        return tx.update(updates, state, params, **update_args)

    return optax.GradientTransformation(tx.init, update_fn)


class PenaltyTrainState(train_state.TrainState):
    """``TrainState`` whose ``apply_gradients`` hands extra arguments to ``tx.update``.

    Flax's ``TrainState.apply_gradients(grads=..., **kwargs)`` treats every keyword as a field
    to replace, so ``penalty_grad_fn=...`` fails there. Here keywords that name a field of the
    state are replaced as before, and all others are passed to the optimizer's ``update``::

        state = state.apply_gradients(grads=grads, penalty_grad_fn=jax.grad(batch_loss))

    A misspelt field name therefore reaches ``tx.update`` instead of failing, where optax
    chains ignore keywords that no transformation takes.
    """

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> PenaltyTrainState:
        """Applies ``grads`` through ``tx`` with the non-field ``kwargs`` as update arguments.

        Args:
          grads: gradients shaped like ``params``.
          **kwargs: fields of the state to replace, and keyword arguments of ``tx.update``.

        Returns:
          The state after one step, as Flax's ``TrainState.apply_gradients`` returns it.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        replaced = {name: value for name, value in kwargs.items() if name in fields}
        update_args = {name: value for name, value in kwargs.items() if name not in fields}
        # Flax's own step (with its special cases) on a copy whose tx carries the arguments.
        with_args = self.replace(tx=_with_update_args(self.tx, update_args))
        stepped = super(PenaltyTrainState, with_args).apply_gradients(grads=grads, **replaced)
        return stepped.replace(tx=self.tx)


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
