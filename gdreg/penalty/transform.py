"""The gradient-norm penalty as an optax transformation that takes the batch's gradient function.

Geiping et al. (ICLR 2022, arXiv 2109.14119): ``g' = g + lr_t / 4 * H_B (strength_t * g)`` for
the gradient ``g`` of one batch (block) ``B``; ``penalty_grad_fn`` is passed to ``update`` as an
extra argument, the pattern of ``optax.contrib.sam``.

The transformation trusts its input to be the raw gradient of the batch that
``penalty_grad_fn`` differentiates; by default it verifies that once per run (see ``check``),
because every way of breaking it (clipping, weight decay or an optimizer before it,
``optax.MultiSteps`` around it, another batch or other dropout masks in ``penalty_grad_fn``, a
missing cross-device mean) gives a wrong penalty without any other sign.
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
    _compute_dtype,
    _contains_masked_node,
    _either,
    _fail_if,
    _global_norm,
    _is_float,
    _is_python_number,
    _is_traced,
    _match_structure,
    _mean_over,
    _penalized_gradient,
    _rate_error,
    _uses_full_gradient,
    _varying,
)

#: Relative difference between ``penalty_grad_fn(params)`` and the incoming gradient above which
#: the check raises (or 4 ulps of the incoming gradient's dtype, if larger: bfloat16 gradients
#: are rounded copies). Recomputing the same gradient in float32 agrees to ~1e-6; a different
#: batch, a clipped or decayed gradient differ by far more.
CHECK_TOLERANCE = 1e-3

#: Values of ``gradient_norm_penalty(check=...)``; True means "always", False "never".
CHECKS: tuple[str, ...] = ("first", "always", "never")


class GradientNormPenaltyState(NamedTuple):
    """State of :func:`gradient_norm_penalty`.

    Attributes:
      count: int32 scalar, the number of updates made so far; the ``learning_rate`` and
        ``strength`` schedules are evaluated at this step.
    """

    count: jax.Array


def _mismatch_message(relative_difference: float) -> str:
    return (
        "gradient_norm_penalty: penalty_grad_fn(params) differs from the incoming gradient by "
        f"{relative_difference:.3g} (relative), so the penalty would be wrong. It must see the "
        "raw gradient of the same loss on the same batch at the same parameters: put it first "
        "in the chain (before clipping, weight decay, an optimizer), not inside "
        "optax.MultiSteps, build penalty_grad_fn on the same batch (with the same dropout "
        "masks), and under data parallelism average the incoming gradient over the devices "
        "and pass axis_name. Simplest: gdreg.value_and_penalized_grad, which needs no "
        "penalty_grad_fn. (check=False turns this check off.)"
    )


def _check_mode(check: bool | str) -> str:
    if check is True or check is False:
        return "always" if check else "never"
    if check not in CHECKS:
        raise ValueError(f"check must be True, False or one of {CHECKS}, got check={check!r}")
    return check


def _floating_leaves(tree: PyTree, updates: PyTree, floating: list[int], what: str) -> list:
    leaves = jax.tree.leaves(_match_structure(tree, updates, what))
    return [jnp.asarray(leaves[i]) for i in floating]


def _mismatch(recomputed: list[jax.Array], incoming: list[jax.Array]) -> Any:
    """A failure flag (see ``_fail_if``) for a recomputed gradient unlike the incoming one."""
    if not incoming:
        return False
    dtypes = [_compute_dtype(r, i) for r, i in zip(recomputed, incoming, strict=True)]
    difference = _global_norm(
        [(r.astype(d) - i.astype(d)) for r, i, d in zip(recomputed, incoming, dtypes, strict=True)]
    )
    scale = _global_norm([i.astype(d) for i, d in zip(incoming, dtypes, strict=True)])
    relative = difference / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
    coarsest = max(float(jnp.finfo(i.dtype).eps) for i in incoming)
    tolerance = max(CHECK_TOLERANCE, 4 * coarsest)
    return _fail_if(~(relative <= tolerance), _mismatch_message, relative)


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
    check: bool | str = "first",
    read_sam_grad_fn: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of an explicit gradient-norm penalty to the gradient of one batch.

    For the gradient ``g = grad L_B(theta)`` of a loss on one batch (block) ``B`` this returns
    :func:`gdreg.penalty.hessian.penalized_gradient`, following Geiping et al. (ICLR 2022,
    arXiv 2109.14119)::

        v  = strength_t * g  [+ full_strength * full_grads]
        g' = g + (lr_t / 4) * H_B v          = grad [L_B + strength_t * lr_t / 8 * ||grad L_B||^2]

    with ``lr_t`` and ``strength_t`` evaluated at this transformation's step count.

    Correct only as the FIRST transformation, fed the raw gradient ``g`` of the batch whose
    gradient ``penalty_grad_fn`` computes: ``"forward"`` differences use the incoming update
    as their base point, and every method perturbs along it. Placed after clipping, weight
    decay or an optimizer, inside ``optax.MultiSteps``, or with ``penalty_grad_fn`` built on
    another batch, other dropout masks, or without the cross-device mean, it would compute a
    wrong penalty; the default ``check="first"`` stops that at the first update with one
    gradient evaluation per run. :func:`gdreg.value_and_penalized_grad` needs none of this.

    Works with ``optax.inject_hyperparams`` (traced hyperparameters are checked at run time:
    a negative or non-finite rate or strength is an error), with schedules for
    ``learning_rate`` and ``strength``, and in one chain with ``optax.contrib.sam``, which
    rejects any keyword but its own ``grad_fn(params, i)``: with ``read_sam_grad_fn=True`` this
    transformation reads that one, as ``grad_fn(params, 0)`` (the batch of the incoming
    gradient, as in sam's usual ``lambda p, _: grad(loss)(p, batch)``). It cannot run inside
    ``optax.masked``, which hides the unmasked parameters that ``penalty_grad_fn`` needs, and
    says so. Its state is a step counter only, so it can be used inside ``jax.vmap`` over
    blocks with the state and the parameters unbatched.

    Args:
      learning_rate: the optimizer's learning rate ``lr_t``, a float >= 0 (0: no penalty) or
        the same schedule; required, since the penalty's size is proportional to it. To follow
        a rate changed at run time, wrap this transformation (or the whole chain) in
        ``optax.inject_hyperparams``.
      strength: weight ``>= 0`` of the batch gradient in ``v`` (float or schedule); 0.5 is the
        paper's, 2 is SGD's implicit regularizer.
      eps: L2 length ``> 0`` of the finite-difference step.
      method: ``"forward"`` (the paper's, default: this transformation is the building block
        of the paper's per-block penalty), ``"central"`` or ``"jvp"`` (exact,
        :func:`gdreg.penalty.hessian.hessian_vector_product`).
      full_strength: weight ``>= 0`` of ``full_grads`` in ``v``; None (the paper's setting,
        and the default) or 0 leaves ``full_grads`` out.
      axis_name: under ``shard_map``/``pmap`` with the batch split over this axis: the
        gradients at perturbed parameters are averaged over it, as the incoming gradient must be.
      check: whether to verify that ``penalty_grad_fn(params)`` equals the incoming gradient
        (relative difference at most ``CHECK_TOLERANCE``) and that traced rates and strengths
        are finite and ``>= 0``. ``"first"`` (default): at the first update (step count 0),
        one extra gradient evaluation per run; with ``"jvp"`` at every update, for free (the
        product's forward-over-reverse pass computes that gradient anyway). ``"always"`` (or
        True): at every update, one extra gradient evaluation each with finite differences,
        whose base point is then the recomputed gradient. ``"never"`` (or False): no checks
        (gdreg's engine, which calls this per block). A failure raises ``ValueError`` with the
        fix; under ``jit`` it reaches the caller as a ``JaxRuntimeError`` ending in that
        message (a compiled program can only stop through a host callback).
      read_sam_grad_fn: without ``penalty_grad_fn``, read ``optax.contrib.sam``'s
        ``grad_fn(params, i)`` as ``grad_fn(params, 0)``; otherwise a ``grad_fn`` is an error.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *,
      penalty_grad_fn=None, grad_fn=None, full_grads=None, penalty_check=None,
      **extra_args)`` needs ``params`` and ``penalty_grad_fn`` (parameters -> gradient of the
      same loss on the same batch; or, with ``read_sam_grad_fn``, sam's ``grad_fn``) and,
      when ``full_strength`` is not None or 0, ``full_grads``; ``penalty_check=False`` skips
      the checks for this call (the engine passes it); other keyword arguments are ignored.
      With a Python-number ``strength == 0`` (and no ``full_strength``) or
      ``learning_rate == 0`` it returns the gradients unchanged without calling
      ``penalty_grad_fn``.

    Raises:
      ValueError: at construction for an unknown ``method`` or ``check``, a negative
        ``strength``, ``full_strength`` or ``learning_rate``, or ``eps <= 0``; at update time
        when ``penalty_grad_fn``, ``params`` or a needed ``full_grads`` is missing, for a
        ``grad_fn`` without ``read_sam_grad_fn``, inside ``optax.masked``, and for a failed
        check.
      TypeError: for a hyperparameter that is not a number, an array or a schedule.
    """
    _check_method(method)
    _check_number("eps", eps, positive=True)
    _check_number("strength", strength, positive=False)
    _check_number("full_strength", full_strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=False)
    mode = _check_mode(check)
    inactive = (
        _is_python_number(strength) and strength == 0 and not _uses_full_gradient(full_strength)
    ) or (_is_python_number(learning_rate) and learning_rate == 0)

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
        penalty_check: bool | None = None,
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
                "same loss on the same batch> to update(). Flax's TrainState.apply_gradients "
                "does not pass it on (it takes every keyword for a field of the state): use "
                "gdreg.PenaltyTrainState, whose apply_gradients forwards it to tx.update; with "
                "nnx.Optimizer, optimizer.update(model, grads, penalty_grad_fn=...) does."
            )
        if params is None:
            raise ValueError("params is required by gradient_norm_penalty's update()")

        def grad_at(p):
            if axis_name is not None:
                p = _varying(p, axis_name)
            return _mean_over(penalty_grad_fn(p), axis_name)

        if _uses_full_gradient(full_strength) and full_grads is None:
            raise ValueError(
                f"full_grads is required when full_strength={full_strength!r} is not 0: pass "
                "full_grads=<the second vector> to update()"
            )
        lr_t = _at_step(learning_rate, state.count, "learning_rate")
        strength_t = _at_step(strength, state.count, "strength")
        checking = mode != "never" and penalty_check is not False
        forward_base = None
        failed: Any = False
        guard = None
        if checking:
            params_like = _match_structure(params, updates, "params")
            floating = [i for i, p in enumerate(jax.tree.leaves(params_like)) if _is_float(p)]
            incoming = _floating_leaves(updates, updates, floating, "the incoming gradient")
            for name, value in (("learning_rate", lr_t), ("strength", strength_t)):
                if _is_traced(value):
                    bad = ~(jnp.isfinite(value) & (value >= 0))
                    failed = _either(failed, _fail_if(bad, _rate_error(name), value))
            param_leaves = jax.tree.leaves(params_like)
            # As hessian_vector_product decides whether it recomputes the forward base.
            upcast = any(
                jnp.result_type(param_leaves[i])
                != jnp.promote_types(_compute_dtype(param_leaves[i]), _compute_dtype(g))
                for i, g in zip(floating, incoming, strict=True)
            )
            if method == "jvp" or (method == "forward" and upcast):
                # The product computes penalty_grad_fn(params) anyway (the primal output of
                # "jvp"; forward differences at upcast bfloat16/float16 parameters recompute
                # their base): compare it at every update, for free.
                guard = lambda base: _either(failed, _mismatch(base, incoming))  # noqa: E731
            else:
                recomputed, failed = _recompute(
                    grad_at, params, updates, floating, incoming, state.count, mode, failed
                )
                if method == "forward" and recomputed is not None:
                    # The recomputed gradient is the base of forward differences, so a
                    # mismatch below the tolerance is not amplified by the division by eps_n.
                    leaves, treedef = jax.tree.flatten(updates)
                    for i, leaf in zip(floating, recomputed, strict=True):
                        leaves[i] = leaf
                    forward_base = jax.tree.unflatten(treedef, leaves)
        if guard is None and failed is not False:
            guard = lambda base: failed  # noqa: E731

        new_updates, _, _ = _penalized_gradient(
            grad_at,
            params,
            updates,
            strength=strength_t,
            learning_rate=lr_t,
            method=method,
            eps=eps,
            full_grads=full_grads,
            full_strength=full_strength,
            forward_base=forward_base,
            guard=guard,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _recompute(
    grad_at: GradFn,
    params: PyTree,
    updates: PyTree,
    floating: list[int],
    incoming: list[jax.Array],
    count: jax.Array,
    mode: str,
    failed: Any,
) -> tuple[list[jax.Array] | None, Any]:
    """``penalty_grad_fn(params)``'s floating leaves, compared with the incoming ones.

    With ``mode="first"`` only at step count 0 (``lax.cond`` when the count is traced, so the
    gradient is evaluated at the first update only); elsewhere the incoming leaves come back.
    Returns ``(leaves or None, failure flag)``.
    """

    def recompute():
        # At float32 copies of bfloat16/float16 parameters, as the penalty's own evaluations.
        upcast = jax.tree.map(lambda p: p.astype(_compute_dtype(p)) if _is_float(p) else p, params)
        leaves = _floating_leaves(grad_at(upcast), updates, floating, "penalty_grad_fn(params)")
        leaves = [r.astype(_compute_dtype(i)) for r, i in zip(leaves, incoming, strict=True)]
        return leaves, _mismatch(leaves, incoming)

    if mode == "always":
        leaves, mismatch = recompute()
        return leaves, _either(failed, mismatch)
    if not _is_traced(count):
        if int(count) != 0:
            return None, failed
        leaves, mismatch = recompute()
        return leaves, _either(failed, mismatch)

    def later():
        leaves = [i.astype(_compute_dtype(i)) for i in incoming]
        return leaves, jnp.zeros((), jnp.bool_)

    def first():
        leaves, mismatch = recompute()
        return leaves, jnp.asarray(mismatch)

    leaves, mismatch = jax.lax.cond(count == 0, first, later)
    return leaves, _either(failed, mismatch)
