"""The gradient-norm penalty in Flax Linen training loops: a ``TrainState`` for the transform.

:class:`PenaltyTrainState` is a ``flax.training.train_state.TrainState`` whose
``apply_gradients`` forwards extra keyword arguments (such as ``penalty_grad_fn``) to the optax
chain, for the :func:`gdreg.gradient_norm_penalty` transform (Geiping et al., ICLR 2022; see
:mod:`gdreg.penalty`), which Flax's own plumbing lacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from flax.training import train_state

__all__ = ["PenaltyTrainState"]


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
