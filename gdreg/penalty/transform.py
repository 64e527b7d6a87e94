"""The gradient-norm penalty as an optax transformation that takes the batch's gradient function.

Geiping et al. (ICLR 2022, arXiv 2109.14119): ``g' = g + lr_t / 4 * H_B (strength_t * g)`` for
the gradient ``g`` of one batch (block) ``B``; ``penalty_grad_fn`` is passed to ``update`` as an
extra argument, the pattern of ``optax.contrib.sam``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gdreg.penalty.hessian import (
    GradFn,
    PyTree,
    _at_step,
    _check_method,
    _check_number,
    _contains_masked_node,
    _global_norm,
    _is_float,
    _is_python_number,
    _match_structure,
    _mean_over,
    _uses_full_gradient,
    _varying,
    penalized_gradient,
)

#: Relative difference between ``penalty_grad_fn(params)`` and the incoming gradient above which
#: ``gradient_norm_penalty(check=True)`` raises. Recomputing the same gradient in float32 agrees
#: to ~1e-6; a different batch, a clipped or decayed gradient differ by far more.
CHECK_TOLERANCE = 1e-3


class GradientNormPenaltyState(NamedTuple):
    """State of :func:`gradient_norm_penalty`.

    Attributes:
      count: int32 scalar, the number of updates made so far; the ``learning_rate`` and
        ``strength`` schedules are evaluated at this step.
    """

    count: jax.Array


def _raise_on_mismatch(relative_difference: Any) -> None:
    if not float(relative_difference) <= CHECK_TOLERANCE:
        raise ValueError(
            "gradient_norm_penalty(check=True): penalty_grad_fn(params) differs from the "
            f"incoming gradient by {float(relative_difference):.3g} (relative). The penalty must "
            "see the raw gradient of the same loss on the same batch at the same parameters: "
            "put it first in the chain (before clipping, weight decay, an optimizer or "
            "MultiSteps), build penalty_grad_fn on the same batch (with the same dropout "
            "masks), and under data parallelism average the incoming gradient over devices."
        )


def _from_sam_convention(grad_fn: Callable[[PyTree, int], PyTree], params: PyTree) -> GradFn:
    """``grad_fn(params, i)`` of ``optax.contrib.sam`` as a gradient function of this batch."""
    try:
        inspect.signature(grad_fn).bind(params, 0)
    except TypeError:
        raise ValueError(
            "grad_fn is read with optax.contrib.sam's convention, grad_fn(params, i); pass a "
            "one-argument gradient function as penalty_grad_fn=<params -> gradient> instead"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): trust the call
        pass
    return lambda p: grad_fn(p, 0)


def gradient_norm_penalty(
    *,
    learning_rate: optax.ScalarOrSchedule,
    strength: optax.ScalarOrSchedule = 0.5,
    eps: float = 1e-2,
    method: str = "forward",
    full_strength: float | None = None,
    axis_name: str | None = None,
    check: bool = False,
    read_sam_grad_fn: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of an explicit gradient-norm penalty to the gradient of one batch.

    For the gradient ``g = grad L_B(theta)`` of a loss on one batch (block) ``B`` this returns
    :func:`penalized_gradient`, following Geiping et al. (ICLR 2022, arXiv 2109.14119)::

        v  = strength_t * g  [+ full_strength * full_grads]
        g' = g + (lr_t / 4) * H_B v          = grad [L_B + strength_t * lr_t / 8 * ||grad L_B||^2]

    with ``lr_t`` and ``strength_t`` evaluated at this transformation's step count.

    Correct only as the FIRST transformation, fed the raw gradient ``g`` of the batch whose
    gradient ``penalty_grad_fn`` computes: ``"forward"`` differences use the incoming update
    as their base point and perturb along it. Placed after clipping, weight decay, an optimizer,
    inside ``optax.MultiSteps``, or with ``penalty_grad_fn`` built on another batch, other
    dropout masks, or without the cross-device mean, it computes a wrong penalty without any
    error. ``check=True`` detects that (one extra gradient evaluation per step); the safe
    alternative is :func:`value_and_penalized_grad`, which needs no ``penalty_grad_fn``.

    Works with ``optax.inject_hyperparams`` (traced hyperparameters are not validated), with
    schedules for ``learning_rate`` and ``strength``, and in one chain with
    ``optax.contrib.sam``, which rejects any keyword but its own ``grad_fn(params, i)``: with
    ``read_sam_grad_fn=True`` this transformation reads that one, as ``grad_fn(params, 0)``
    (the batch of the incoming gradient, as in sam's usual ``lambda p, _: grad(loss)(p,
    batch)``). It cannot run inside ``optax.masked``, which hides the unmasked parameters that
    ``penalty_grad_fn`` needs, and says so. Its state is a step counter only, so it can be used
    inside ``jax.vmap`` over blocks with the state and the parameters unbatched.

    Args:
      learning_rate: the optimizer's learning rate ``lr_t``, a float > 0 or the same schedule;
        required, since the penalty's size is proportional to it. To follow a rate changed at
        run time, wrap this transformation (or the whole chain) in ``optax.inject_hyperparams``.
      strength: weight ``>= 0`` of the batch gradient in ``v`` (float or schedule); 0.5 is the
        paper's, 2 is SGD's implicit regularizer.
      eps: L2 length ``> 0`` of the finite-difference step.
      method: ``"forward"``, ``"central"`` or ``"jvp"`` (:func:`hessian_vector_product`).
      full_strength: weight ``>= 0`` of ``full_grads`` in ``v``; None (the paper's setting,
        and the default) or 0 leaves ``full_grads`` out.
      axis_name: under ``shard_map``/``pmap`` with the batch split over this axis: the
        gradients at perturbed parameters are averaged over it, as the incoming gradient must be.
      check: recompute ``penalty_grad_fn(params)`` and raise if it differs from the incoming
        gradient by more than ``CHECK_TOLERANCE`` (relative); under ``jit`` the error arrives
        as a runtime error from a ``jax.debug.callback``. The recomputed gradient is then the
        base point of forward differences.
      read_sam_grad_fn: without ``penalty_grad_fn``, read ``optax.contrib.sam``'s
        ``grad_fn(params, i)`` as ``grad_fn(params, 0)``; otherwise a ``grad_fn`` is an error.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *,
      penalty_grad_fn=None, grad_fn=None, full_grads=None, **extra_args)`` needs ``params`` and
      ``penalty_grad_fn`` (parameters -> gradient of the same loss on the same batch; or, with
      ``read_sam_grad_fn``, sam's ``grad_fn``) and, when ``full_strength`` is not None or 0,
      ``full_grads``; other keyword arguments are ignored. With a Python-number
      ``strength == 0`` and no ``full_strength`` it returns the gradients unchanged without
      calling ``penalty_grad_fn``.

    Raises:
      ValueError: at construction for an unknown ``method``, a negative ``strength`` or
        ``full_strength``, ``learning_rate <= 0`` or ``eps <= 0``; at update time when
        ``penalty_grad_fn``, ``params`` or a needed ``full_grads`` is missing, for a ``grad_fn``
        without ``read_sam_grad_fn``, or inside ``optax.masked``.
      TypeError: for a hyperparameter that is not a number, an array or a schedule.
    """
    _check_method(method)
    _check_number("eps", eps, positive=True)
    _check_number("strength", strength, positive=False)
    _check_number("full_strength", full_strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=True)
    inactive = (
        _is_python_number(strength) and strength == 0 and not _uses_full_gradient(full_strength)
    )

    def init_fn(params: PyTree) -> GradientNormPenaltyState:
        del params
        return GradientNormPenaltyState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: PyTree,
        state: GradientNormPenaltyState,
        params: PyTree | None = None,
        *,
        penalty_grad_fn: GradFn | None = None,
        grad_fn: Callable[[PyTree, int], PyTree] | None = None,
        full_grads: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, GradientNormPenaltyState]:
        new_state = GradientNormPenaltyState(count=optax.safe_increment(state.count))
        if inactive:
            return updates, new_state
        if _contains_masked_node(updates) or _contains_masked_node(params):
            raise ValueError(
                "gradient_norm_penalty cannot run inside optax.masked: the mask hides parameters "
                "that penalty_grad_fn needs. Put it outside the mask, or use "
                "gdreg.value_and_penalized_grad and mask what follows."
            )
        if penalty_grad_fn is None and grad_fn is not None:
            if not read_sam_grad_fn:
                raise ValueError(
                    "grad_fn is optax.contrib.sam's argument and is not read: pass "
                    "penalty_grad_fn=<params -> gradient of the same loss on the same batch>, "
                    "or, in one chain with sam, build with read_sam_grad_fn=True"
                )
            penalty_grad_fn = _from_sam_convention(grad_fn, params)
        if penalty_grad_fn is None:
            raise ValueError(
                "penalty_grad_fn is required: pass penalty_grad_fn=<params -> gradient of the "
                "same loss on the same batch> to update()"
            )
        if params is None:
            raise ValueError("params is required by gradient_norm_penalty's update()")

        def grad_at(p):
            if axis_name is not None:
                p = _varying(p, axis_name)
            return _mean_over(penalty_grad_fn(p), axis_name)

        recomputed = None
        if check:
            recomputed = _match_structure(grad_at(params), updates, "penalty_grad_fn(params)")
            floats = [
                (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
                for a, b in zip(jax.tree.leaves(recomputed), jax.tree.leaves(updates), strict=True)
                if _is_float(b)
            ]
            difference = _global_norm([a - b for a, b in floats])
            scale = _global_norm([b for _, b in floats])
            relative = difference / jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)
            if isinstance(relative, jax.core.Tracer):
                jax.debug.callback(_raise_on_mismatch, relative)
            else:
                _raise_on_mismatch(relative)

        new_updates = penalized_gradient(
            grad_at,
            params,
            updates,
            strength=_at_step(strength, state.count, "strength"),
            learning_rate=_at_step(learning_rate, state.count, "learning_rate"),
            method=method,
            eps=eps,
            full_grads=full_grads,
            full_strength=full_strength,
            # With the check, the base of forward differences is the recomputed gradient, so a
            # mismatch below the tolerance is not amplified by the division by eps_n.
            forward_base=recomputed,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
