"""The gradient-norm penalty in Flax Linen training loops: a ``TrainState`` for the transform.

:class:`PenaltyTrainState` is a ``flax.training.train_state.TrainState`` whose
``apply_gradients`` forwards extra keyword arguments (such as ``penalty_grad_fn``) to the optax
chain, for the :func:`gdreg.gradient_norm_penalty` transform (Geiping et al., ICLR 2022; see
:mod:`gdreg.penalty`), which Flax's own plumbing lacks.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import optax
from flax.training import train_state

__all__ = ["UPDATE_ARGS", "PenaltyTrainState"]


def _with_update_args(
    tx: optax.GradientTransformation, update_args: dict[str, Any]
) -> optax.GradientTransformation:
    """``tx`` with ``update_args`` bound as keyword arguments of every ``update`` call."""
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None):
        return tx.update(updates, state, params, **update_args)

    return optax.GradientTransformation(tx.init, update_fn)


#: The keyword arguments of ``tx.update`` that ``apply_gradients`` passes on by name: those of
#: :func:`gdreg.gradient_norm_penalty` (and ``optax.contrib.sam``'s ``grad_fn``).
UPDATE_ARGS: tuple[str, ...] = ("penalty_grad_fn", "full_grads", "grad_fn", "penalty_check")


class PenaltyTrainState(train_state.TrainState):
    """``TrainState`` whose ``apply_gradients`` hands extra arguments to ``tx.update``.

    Flax's ``TrainState.apply_gradients(grads=..., **kwargs)`` treats every keyword as a field
    to replace, so ``penalty_grad_fn=...`` fails there. Here keywords that name a field of the
    state are replaced as before, the update arguments of :func:`gdreg.gradient_norm_penalty`
    (:data:`UPDATE_ARGS`) are passed to the optimizer's ``update``, and any other argument of
    ``tx.update`` goes in ``update_args={...}``::

        state = state.apply_gradients(grads=grads, penalty_grad_fn=jax.grad(batch_loss))

    Any other keyword is a ``TypeError``, as in Flax, so that a misspelt field
    (``batch_stat=``) is not silently handed to an optimizer that ignores it.
    """

    def apply_gradients(
        self, *, grads: Any, update_args: dict[str, Any] | None = None, **kwargs: Any
    ) -> PenaltyTrainState:
        """Applies ``grads`` through ``tx`` with the update arguments passed to ``tx.update``.

        Args:
          grads: gradients shaped like ``params``.
          update_args: further keyword arguments of ``tx.update`` (for other
            ``GradientTransformationExtraArgs`` in the chain).
          **kwargs: fields of the state to replace, and the keywords in :data:`UPDATE_ARGS`.

        Returns:
          The state after one step, as Flax's ``TrainState.apply_gradients`` returns it.

        Raises:
          TypeError: for a keyword that is neither a field nor in :data:`UPDATE_ARGS`.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - fields - set(UPDATE_ARGS))
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"PenaltyTrainState.apply_gradients() got an unexpected keyword argument "
                f"{name!r}{hint}: it is neither a field of {type(self).__name__} "
                f"({', '.join(sorted(fields - {'tx', 'apply_fn'}))}) nor an argument of "
                f"gradient_norm_penalty's update ({', '.join(UPDATE_ARGS)}); pass other "
                "arguments of tx.update as update_args={...}"
            )
        replaced = {name: value for name, value in kwargs.items() if name in fields}
        passed = {name: value for name, value in kwargs.items() if name not in fields}
        passed.update(update_args or {})
        # Flax's own step (with its special cases) on a copy whose tx carries the arguments.
        with_args = self.replace(tx=_with_update_args(self.tx, passed))
        stepped = super(PenaltyTrainState, with_args).apply_gradients(grads=grads, **replaced)
        return stepped.replace(tx=self.tx)
