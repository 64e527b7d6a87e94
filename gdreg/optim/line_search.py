"""An Armijo line search along the update, for full-batch steps.

An optax transformation sees one gradient per update, so this is a pure function of callables
that the training step calls around its engine: ``loss_fn(params)`` is the full-batch loss (a
forward-only engine call). It runs eagerly, on replicated or host arrays alike, and makes exactly
the evaluations it documents.

:func:`armijo_step` backtracks until the Armijo sufficient-decrease condition holds (Armijo 1966;
Nocedal & Wright, "Numerical Optimization", Alg. 3.1), the condition of
``optax.scale_by_backtracking_linesearch``, whose ``lax.while_loop`` cannot call the full-batch
engine. The reference's ``SGDLineSearch`` (``additional_optimizers/fista.py``) backtracks the same
way (factor 0.5, at most 25 times) but tests ``L(p') <= L(p) - alpha * lr * ||d||`` with the norm
in place of the slope; it is not reachable from the reference's configuration (``line_search``
there offers ``wolfe``, ``non-monotone`` and ``restarting``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

#: A nested structure of arrays (parameters, gradients, updates).
PyTree = Any


class ArmijoSettings(NamedTuple):
    """The line search's knobs (``optim.line_search_*``)."""

    slope_rtol: float = 1e-4  # c in L(p + eta u) <= L(p) + c * eta * <g, u>
    decrease_factor: float = 0.5  # beta: eta <- beta * eta after each rejected step
    max_backtracking_steps: int = 25


class LineSearchResult(NamedTuple):
    """The step :func:`armijo_step` took."""

    params: PyTree  # params + step_size * updates
    step_size: float  # the accepted factor eta (0: no step could be taken)
    value: float  # the loss at the new params
    evaluations: int  # calls of loss_fn (the value at params included when it was computed)


@jax.jit
def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return optax.tree.vdot(a, b)


@jax.jit
def _add_scaled(params: PyTree, scale: jax.Array, updates: PyTree) -> PyTree:
    return jax.tree.map(lambda p, u: p + (scale * u).astype(p.dtype), params, updates)


def armijo_step(
    loss_fn: Callable[[PyTree], Any],
    params: PyTree,
    updates: PyTree,
    grads: PyTree,
    *,
    learning_rate: float = 1.0,
    value: float | None = None,
    settings: ArmijoSettings | None = None,
) -> LineSearchResult:
    """Backtracks along ``updates`` until the Armijo condition holds.

    With ``eta_k = learning_rate * beta^k`` (``beta`` = ``settings.decrease_factor``) for
    ``k = 0, 1, ..., K`` (``K`` = ``settings.max_backtracking_steps``), takes the first
    ``eta_k`` with::

        L(params + eta_k * updates) <= L(params) + c * eta_k * <grads, updates>

    (``c`` = ``settings.slope_rtol``; ``<grads, updates>`` the slope of ``eta -> L(params +
    eta * updates)`` at 0, negative for a descent direction). If none holds, the last one tried
    is taken, as ``optax.scale_by_backtracking_linesearch`` does; if its loss is not finite, no
    step (``step_size`` 0). With ``learning_rate = 1`` and ``updates`` the optimizer's update
    (``tx.update``'s output, learning rate included) this is optax's condition; with
    ``updates = -grads`` and ``learning_rate = lr`` it is backtracking gradient descent.

    For ``L = 1/2 x^T A x`` and ``updates = -g`` the condition reads ``eta <= 2 (1 - c) ||g||^2
    / (g^T A g)``, so the accepted ``eta`` is the largest ``learning_rate * beta^k`` below it.

    Args:
      loss_fn: parameters -> the full-batch loss (a Python float or a scalar array).
      params: the current parameters.
      updates: the proposed change of the parameters (``new = params + eta * updates``).
      grads: the gradient of ``loss_fn`` at ``params`` (for the slope).
      learning_rate: the first factor tried.
      value: ``loss_fn(params)`` if known (saves one evaluation).
      settings: ``c``, ``beta`` and ``K`` (None: :class:`ArmijoSettings`' defaults).

    Returns:
      :class:`LineSearchResult`: the new parameters, the accepted factor, the loss there, and
      the number of ``loss_fn`` calls (at most ``K + 2``).
    """
    settings = ArmijoSettings() if settings is None else settings
    if not 0 < settings.decrease_factor < 1:
        raise ValueError(f"decrease_factor must be in (0, 1), got {settings.decrease_factor}")
    if not 0 < settings.slope_rtol < 1:
        raise ValueError(f"slope_rtol must be in (0, 1), got {settings.slope_rtol}")
    if settings.max_backtracking_steps < 0:
        raise ValueError(
            f"max_backtracking_steps must be >= 0, got {settings.max_backtracking_steps}"
        )
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    evaluations = 0
    if value is None:
        value, evaluations = float(loss_fn(params)), 1
    value = float(value)
    slope = float(_vdot(grads, updates))
    step_size = float(learning_rate)
    for k in range(settings.max_backtracking_steps + 1):
        if k:
            step_size *= settings.decrease_factor
        candidate = _add_scaled(params, jnp.asarray(step_size), updates)
        new_value = float(loss_fn(candidate))
        evaluations += 1
        if new_value <= value + settings.slope_rtol * step_size * slope:
            return LineSearchResult(candidate, step_size, new_value, evaluations)
    if not math.isfinite(new_value):
        return LineSearchResult(params, 0.0, value, evaluations)
    return LineSearchResult(candidate, step_size, new_value, evaluations)
