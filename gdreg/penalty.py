"""Explicit gradient-norm penalty: a drop-in for ``jax.value_and_grad`` and an Optax transform.

Gradient descent with step size ``tau`` stays, up to ``O(tau^2)``, on the gradient-flow path
of a modified loss (Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021,
arXiv 2009.11162, for full-batch steps; Smith, Dherin, Barrett & De, "On the Origin of Implicit
Regularization in Stochastic Gradient Descent", ICLR 2021, arXiv 2101.12176, for an epoch of
``m`` minibatch steps)::

    L(theta) + tau / (4 m) * sum_B || grad L_B(theta) ||^2        (m minibatches B)

Geiping, Goldblum, Pope, Moeller & Goldstein, "Stochastic Training is Not Necessary for
Generalization" (ICLR 2022, arXiv 2109.14119) add this term explicitly to the full-batch
objective, with the blocks ``B`` of the full batch in place of SGD's minibatches. Its gradient is
the mean over blocks of ``tau / 2 * H_B g_B`` (``H_B``, ``g_B``: Hessian and gradient of
``L_B``), one Hessian-vector product per block, which this module computes by finite differences
of gradients (as the paper does) or exactly, by forward-over-reverse autodiff.

Public pieces, from the safest to the most flexible:

* :func:`value_and_penalized_grad`: wraps a loss like ``jax.value_and_grad`` and returns the
  penalized gradient of one batch, computed from that batch alone, so whatever optimizer,
  clipping, masking or accumulation follows receives a correct gradient.
* :func:`gradient_norm_penalty`: the same as an ``optax.GradientTransformationExtraArgs`` that
  must come first in a chain and be given ``penalty_grad_fn``.
* :func:`penalized_gradient` and :func:`hessian_vector_product`: the pure math.

Finite differences are not the exact Hessian on piecewise-linear networks: for ReLU networks the
gradient jumps where units switch on or off, and a difference over a step of L2 length ``eps``
sees those jumps, so ``"forward"``/``"central"`` at ``eps = 1e-2`` and ``"jvp"`` (the Hessian of
the almost-everywhere smooth pieces) differ by a factor of several, more as ``eps`` shrinks.
They are two different regularizers there; the paper's numbers come from forward differences at
``eps = 1e-2``. With smooth activations all three agree to ``O(eps)``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gdreg.types import PyTree

__all__ = [
    "METHODS",
    "GradientNormPenaltyState",
    "gradient_norm_penalty",
    "hessian_vector_product",
    "penalized_gradient",
    "value_and_penalized_grad",
]

GradFn = Callable[[PyTree], Any]

#: Ways to compute the Hessian-vector product, see :func:`hessian_vector_product`.
METHODS: tuple[str, ...] = ("forward", "central", "jvp")

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


# ----- argument checks (Python numbers only: traced hyperparameters are not inspected) ----------


def _is_python_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    """Rejects a bad number or a non-number; traced values and schedules pass unchecked."""
    if value is None or callable(value) or isinstance(value, jax.core.Tracer):
        return
    if hasattr(value, "dtype") and jnp.size(value) == 1:
        value = float(value)  # a concrete array: checked like a Python number
    if not _is_python_number(value):
        raise TypeError(f"{name} must be a number, an array or a schedule, got {name}={value!r}")
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {name}={value!r}")


# ----- pytree helpers -------------------------------------------------------------------------


def _is_float(leaf: Any) -> bool:
    # jax.grad(allow_int=True) gives integer leaves float0 gradients, which result_type rejects.
    dtype = getattr(leaf, "dtype", None)
    return jnp.issubdtype(jnp.result_type(leaf) if dtype is None else dtype, jnp.floating)


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    # bfloat16/float16 cannot represent a perturbation of relative size ~1e-3 of a weight, nor
    # the small difference of two nearby gradients, so everything runs in at least float32.
    return jnp.promote_types(jnp.result_type(*(jnp.asarray(a).dtype for a in arrays)), jnp.float32)


def _global_norm(leaves: list[jax.Array]) -> jax.Array:
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*(leaf.dtype for leaf in leaves))
    leaves = [leaf.astype(dtype) for leaf in leaves]
    # Scaling by the largest entry keeps the squares from overflowing (entries above ~1e19 in
    # float32, which would make eps_n zero and the quotient NaN) or underflowing.
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf), initial=0) for leaf in leaves]))
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return scale * jnp.sqrt(sum(jnp.sum(jnp.square(leaf / scale)) for leaf in leaves))


def _uses_full_gradient(full_strength: Any) -> bool:
    # None or a Python 0 switch the second vector off; a traced value (inject_hyperparams) or a
    # positive number switch it on.
    return not (full_strength is None or (_is_python_number(full_strength) and full_strength == 0))


def _contains_masked_node(tree: PyTree) -> bool:
    masked = jax.tree.leaves(
        tree, is_leaf=lambda node: isinstance(node, optax.MaskedNode)
    )  # MaskedNode is an empty pytree: only is_leaf makes it visible
    return any(isinstance(node, optax.MaskedNode) for node in masked)


def _match_structure(tree: PyTree, like: PyTree, what: str) -> PyTree:
    """Returns ``tree`` with the tree structure of ``like``.

    A gradient function may wrap its leaves differently from the parameters it was given (for
    example Flax NNX ``nnx.grad`` returns ``Param`` variables where the optimizer passes plain
    arrays); the leaves are then matched in order, provided their number and shapes agree.
    """
    like_def = jax.tree.structure(like)
    leaves, like_leaves = jax.tree.leaves(tree), jax.tree.leaves(like)
    if len(leaves) != len(like_leaves) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(leaves, like_leaves, strict=True)
    ):
        raise ValueError(
            f"{what} is not shaped like the parameters: got {jax.tree.map(jnp.shape, tree)}, "
            f"expected {jax.tree.map(jnp.shape, like)}"
        )
    if jax.tree.structure(tree) == like_def:
        return tree
    return jax.tree.unflatten(like_def, leaves)


def _varying_axes(value: Any) -> frozenset[str] | None:
    """The mesh axes ``value`` varies over under shard_map's checks (None: not tracked)."""
    aval = jax.typeof(value)
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return getattr(aval, "vma", None) if varying is None else varying


def _varying(tree: PyTree, axis_name: str) -> PyTree:
    """Marks replicated parameters as varying over ``axis_name`` inside ``shard_map``.

    With shard_map's varying-axes checks on (the default), autodiff sums the gradient of a
    device-local loss with respect to replicated parameters over the devices; differentiating at
    varying parameters keeps it local, so that the explicit mean is the only reduction. Outside
    shard_map (``vmap``), or with the checks off, there is nothing to mark.
    """
    mark_varying = getattr(jax.lax, "pcast", None)

    def mark(leaf):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        manual_axes = getattr(mesh, "manual_axes", None)
        if manual_axes is not None and axis_name not in manual_axes:
            return leaf
        varying = _varying_axes(leaf)
        if varying is None or axis_name in varying:
            return leaf
        if mark_varying is None:  # jax before pcast
            return jax.lax.pvary(leaf, axis_name)
        return mark_varying(leaf, axis_name, to="varying")

    return jax.tree.map(mark, tree)


def _mean_over(tree: PyTree, axis_name: str | None) -> PyTree:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


# ----- the math -------------------------------------------------------------------------------


def hessian_vector_product(
    grad_fn: GradFn,
    params: PyTree,
    vector: PyTree,
    *,
    method: str = "forward",
    eps: float | jax.Array = 1e-2,
    grads: PyTree | None = None,
    has_aux: bool = False,
) -> PyTree | tuple[PyTree, Any]:
    """Hessian-vector product ``H(params) @ vector`` of the loss whose gradient is ``grad_fn``.

    With ``H`` the Hessian of the loss ``L`` behind ``grad_fn = grad L`` and the step
    ``eps_n = eps / ||vector||_2`` (global L2 norm over the pytree, so the parameters move by
    exactly ``eps`` in L2 distance), the methods are those of Geiping et al. (ICLR 2022, the
    finite-difference gradient regularizer, and the authors' reference implementation):

    * ``"forward"``: ``(grad L(params + eps_n v) - grad L(params)) / eps_n``, error ``O(eps)``;
      one gradient evaluation when ``grads = grad L(params)`` is passed, two otherwise.
    * ``"central"``: ``(grad L(params + eps_n/2 v) - grad L(params - eps_n/2 v)) / eps_n``,
      error ``O(eps^2)``; two gradient evaluations.
    * ``"jvp"``: exact ``H v = d/dt grad L(params + t v) |_{t=0}`` by forward-over-reverse
      autodiff (``jax.jvp`` of ``grad_fn``); ``eps`` and ``grads`` are unused.

    Only floating-point leaves are differentiated: integer (or boolean) leaves of ``params``
    reach ``grad_fn`` unchanged, whatever ``grad_fn`` returns for them is ignored, and their
    product is zero. Every floating leaf is handled in at least float32 (bfloat16/float16 leaves
    are upcast): the perturbed parameters passed to ``grad_fn``, the vector, the difference of
    gradients and the division. A zero vector gives a zero product (never NaN), although
    ``grad_fn`` is still evaluated so that the function traces the same way for any input.

    Args:
      grad_fn: maps parameters to the gradient of a fixed loss (on fixed data) at those
        parameters, as a pytree shaped like ``params``; with ``has_aux``, to a pair
        ``(gradient, aux)``.
      params: the point at which the Hessian is taken.
      vector: pytree with the structure and shapes of ``params``.
      method: ``"forward"``, ``"central"`` or ``"jvp"``.
      eps: L2 length of the finite-difference step, > 0.
      grads: ``grad_fn(params)`` if already known, which saves one evaluation for ``"forward"``
        (unless parameters are upcast from a lower precision: the base is then recomputed).
      has_aux: whether ``grad_fn`` returns ``(gradient, aux)``.

    Returns:
      ``H v`` with the structure of ``params``; each floating leaf in the dtype promoted from
      the parameter, the vector leaf and float32. With ``has_aux``, the pair ``(H v, aux)``
      where ``aux`` is what ``grad_fn`` returned at the perturbed point: ``params + eps_n v``
      for ``"forward"``, the pair (at ``+eps_n/2 v``, at ``-eps_n/2 v``) for ``"central"``, and
      at ``params`` for ``"jvp"``.

    Raises:
      ValueError: for an unknown ``method``, ``eps <= 0``, or a ``grad_fn`` output or
        ``grads`` not shaped like ``params``.
    """
    _check_method(method)
    _check_number("eps", eps, positive=True)
    param_leaves, treedef = jax.tree.flatten(params)
    vector_leaves = jax.tree.leaves(_match_structure(vector, params, "the vector"))
    floating = [i for i, leaf in enumerate(param_leaves) if _is_float(leaf)]
    dtypes = [_compute_dtype(param_leaves[i], vector_leaves[i]) for i in floating]
    x0 = [jnp.asarray(param_leaves[i]).astype(d) for i, d in zip(floating, dtypes, strict=True)]
    v = [jnp.asarray(vector_leaves[i]).astype(d) for i, d in zip(floating, dtypes, strict=True)]

    def floating_part(tree: PyTree, what: str) -> list[jax.Array]:
        leaves = jax.tree.leaves(_match_structure(tree, params, what))
        return [jnp.asarray(leaves[i]).astype(d) for i, d in zip(floating, dtypes, strict=True)]

    def evaluate(at: list[jax.Array]) -> tuple[list[jax.Array], Any]:
        leaves = list(param_leaves)
        for i, leaf in zip(floating, at, strict=True):
            leaves[i] = leaf
        out = grad_fn(jax.tree.unflatten(treedef, leaves))
        out, aux = out if has_aux else (out, None)
        return floating_part(out, "the output of grad_fn"), aux

    if method == "jvp":
        _, product, aux = jax.jvp(evaluate, (x0,), (v,), has_aux=True)
    else:
        norm = _global_norm(v)
        nonzero = norm > 0
        # The guard keeps eps_n finite for a zero vector; the product is then masked to zero.
        eps_n = eps / jnp.where(nonzero, norm, jnp.ones_like(norm))

        def shifted(scale: float) -> list[jax.Array]:
            return [x + (scale * eps_n * u).astype(x.dtype) for x, u in zip(x0, v, strict=True)]

        if method == "forward":
            # A base gradient taken at bfloat16/float16 parameters differs from the one at their
            # float32 copies by far more than the difference resolves: recompute it there.
            upcast = any(
                jnp.result_type(param_leaves[i]) != d for i, d in zip(floating, dtypes, strict=True)
            )
            given = grads is not None and not upcast
            base = floating_part(grads, "grads") if given else evaluate(x0)[0]
            ahead, aux = evaluate(shifted(1.0))
            diff = [a - b for a, b in zip(ahead, base, strict=True)]
        else:  # central
            ahead, aux_ahead = evaluate(shifted(0.5))
            behind, aux_behind = evaluate(shifted(-0.5))
            diff = [a - b for a, b in zip(ahead, behind, strict=True)]
            aux = (aux_ahead, aux_behind)
        product = [jnp.where(nonzero, d / eps_n.astype(d.dtype), jnp.zeros_like(d)) for d in diff]

    leaves = [jnp.zeros_like(leaf) for leaf in param_leaves]
    for i, leaf in zip(floating, product, strict=True):
        leaves[i] = leaf
    result = jax.tree.unflatten(treedef, leaves)
    return (result, aux) if has_aux else result


def penalized_gradient(
    grad_fn: GradFn,
    params: PyTree,
    grads: PyTree,
    *,
    strength: float | jax.Array,
    learning_rate: float | jax.Array,
    method: str = "forward",
    eps: float | jax.Array = 1e-2,
    full_grads: PyTree | None = None,
    full_strength: float | jax.Array | None = None,
    forward_base: PyTree | None = None,
    has_aux: bool = False,
) -> PyTree | tuple[PyTree, Any]:
    """The gradient of ``L + strength * lr / 8 * ||grad L||^2`` from ``g = grad L(params)``.

    Geiping et al. (ICLR 2022, arXiv 2109.14119, and the authors' implementation of the
    regularizer's gradient)::

        v  = strength * g  [+ full_strength * full_grads]
        g' = g + (lr / 4) * H v

    with ``H`` the Hessian of ``L`` at ``params`` (:func:`hessian_vector_product`; ``"forward"``
    uses ``grads`` as its base point, so ``grads`` must equal ``grad_fn(params)``). With
    ``full_strength = 0`` the added term ``strength * lr / 4 * H g`` is the gradient of
    ``strength * lr / 8 * ||grad L||^2``. ``strength = 2`` gives SGD's implicit regularizer
    ``lr / 4 * ||grad L||^2`` (Smith et al., ICLR 2021); the paper's runs use 0.5.

    Non-floating leaves of ``grads`` are returned unchanged; floating leaves keep their dtype.

    Args:
      grad_fn: parameters -> gradient of the same loss on the same data (with ``has_aux``,
        ``(gradient, aux)``).
      params: the current parameters.
      grads: ``grad_fn(params)``.
      strength: weight of ``g`` in ``v``, a scalar >= 0.
      learning_rate: the optimizer's learning rate at this step, a scalar > 0.
      method: ``"forward"``, ``"central"`` or ``"jvp"``.
      eps: L2 length of the finite-difference step.
      full_grads: a second vector for ``v`` (the full-batch gradient in the reference's
        "acc_strength" variant); needed unless ``full_strength`` is None or 0.
      full_strength: its weight (None: no second vector).
      forward_base: ``grad_fn(params)`` evaluated separately, as the base point of forward
        differences in place of ``grads`` (which then only sets the direction and the sum).
      has_aux: whether ``grad_fn`` returns ``(gradient, aux)``.

    Returns:
      ``g'`` shaped like ``grads``; with ``has_aux``, ``(g', aux)`` where ``aux`` comes from the
      perturbed evaluations as described in :func:`hessian_vector_product`.
    """
    _check_number("strength", strength, positive=False)
    _check_number("full_strength", full_strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=True)
    uses_full = _uses_full_gradient(full_strength)
    if uses_full and full_grads is None:
        raise ValueError(
            f"full_grads is required when full_strength={full_strength!r} is not 0 (a traced "
            "full_strength, e.g. under optax.inject_hyperparams, counts as not 0: leave "
            "full_strength out, or pass full_grads)"
        )

    def weighted(g):
        return strength * jnp.asarray(g).astype(_compute_dtype(g)) if _is_float(g) else g

    vector = jax.tree.map(weighted, grads)
    if uses_full:
        full = _match_structure(full_grads, grads, "full_grads")
        vector = jax.tree.map(
            lambda u, f: u + full_strength * jnp.asarray(f).astype(u.dtype) if _is_float(u) else u,
            vector,
            full,
        )
    params_like = _match_structure(params, grads, "params")
    base = (grads if forward_base is None else forward_base) if method == "forward" else None
    out = hessian_vector_product(
        grad_fn, params_like, vector, method=method, eps=eps, grads=base, has_aux=has_aux
    )
    product, aux = out if has_aux else (out, None)
    coef = jnp.asarray(learning_rate) / 4

    def add(g, h):
        if not _is_float(g):
            return g
        return (jnp.asarray(g).astype(h.dtype) + coef.astype(h.dtype) * h).astype(g.dtype)

    result = jax.tree.map(add, grads, _match_structure(product, grads, "the product"))
    return (result, aux) if has_aux else result


def _at_step(value: optax.ScalarOrSchedule, step: Any, name: str) -> Any:
    if not callable(value):
        return value
    if step is None:
        raise ValueError(f"{name} is a schedule: pass step=<the optimizer step> to the call")
    return value(step)


def _check_consumed_keywords(loss_fn: Callable[..., Any]) -> None:
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # no signature to inspect
        return
    clash = [
        name
        for name in ("step", "learning_rate")
        if name in parameters and parameters[name].kind != inspect.Parameter.POSITIONAL_ONLY
    ]
    if clash:
        raise ValueError(
            f"loss_fn takes {' and '.join(clash)}, which the penalized function consumes as its "
            "own keyword arguments; wrap loss_fn so that it takes them under other names"
        )


def _check_device_local(params: PyTree, value: jax.Array, axis_name: str) -> None:
    """Rejects a loss already averaged over ``axis_name`` (shard_map's checks make it visible).

    Differentiating the mean over devices at device-varying parameters gives each device
    1/N of its gradient; the mean taken afterwards would then be N times too small.
    """
    floating = [leaf for leaf in jax.tree.leaves(params) if _is_float(leaf)]
    if not floating or axis_name not in (_varying_axes(floating[0]) or ()):
        return  # varying axes not tracked (pmap, check_vma=False): a reduced loss is harmless
    if axis_name not in (_varying_axes(value) or ()):
        raise ValueError(
            f"loss_fn returned a value already reduced over axis_name={axis_name!r}: give it "
            "this device's loss (no pmean/psum inside); the penalized function averages the "
            "gradient over the devices itself"
        )


def value_and_penalized_grad(
    loss_fn: Callable[..., Any],
    *,
    learning_rate: optax.ScalarOrSchedule | None,
    strength: optax.ScalarOrSchedule = 0.5,
    method: str = "forward",
    eps: float = 1e-2,
    has_aux: bool = False,
    axis_name: str | None = None,
) -> Callable[..., tuple[Any, PyTree]]:
    """Like ``jax.value_and_grad(loss_fn)``, with the gradient-norm penalty added to the gradient.

    The returned function computes, on one batch (the arguments after ``params``)::

        g  = grad L(params)                         (mean over ``axis_name`` if given)
        g' = g + strength * lr / 4 * H g            = grad [L + strength * lr / 8 * ||grad L||^2]

    (Geiping et al., ICLR 2022; see :func:`penalized_gradient`), with ``H g`` from
    :func:`hessian_vector_product` at the same batch and the same parameters. Because the
    penalty is computed here, from the loss itself, whatever follows (any optax chain,
    clipping, weight decay, ``optax.masked``, ``optax.MultiSteps``, a Flax ``TrainState``)
    receives an already-penalized gradient and cannot change what the penalty means.

    Call it as ``value, grads = f(params, *args, **kwargs)``; two keyword arguments are
    consumed by the wrapper and never reach ``loss_fn``:

    * ``step``: the optimizer step, needed when ``learning_rate`` or ``strength`` is a schedule;
    * ``learning_rate``: the rate at this call, when the wrapper was built with
      ``learning_rate=None`` (for a rate that changes at run time, e.g. reduce-on-plateau).

    Cost per call: ``"forward"`` two gradient evaluations (one more than plain training),
    ``"central"`` three, ``"jvp"`` about three to four (one forward-over-reverse pass).

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with
        ``has_aux``), differentiated with respect to its first argument.
      learning_rate: the optimizer's learning rate ``lr``: a float > 0, an Optax schedule of the
        step, or None to pass it at each call. With momentum ``mu`` the effective step is
        ``lr / (1 - mu)``; the paper (and gdreg's training program) still uses ``lr``.
      strength: the weight of the penalty, a float >= 0 or a schedule.
      method: ``"forward"`` (the paper's, default), ``"central"`` or ``"jvp"`` (exact).
      eps: L2 length > 0 of the finite-difference step.
      has_aux: as in ``jax.value_and_grad``; ``aux`` comes from the unperturbed evaluation.
      axis_name: inside ``shard_map`` or ``pmap`` over a batch split across devices, the mapped
        axis: the gradient is averaged over it before the perturbation (and the value too),
        which gives exactly the single-device result on the global batch. ``loss_fn`` must
        return the device's own loss, not a mean over devices. ``aux`` stays local.

    Returns:
      A function returning ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``);
      ``value`` is the loss ``L`` itself, without the penalty.

    Raises:
      ValueError: at construction for an unknown method, a negative strength, a learning rate
        <= 0, ``eps <= 0``, or a ``loss_fn`` with its own ``step`` or ``learning_rate``
        keyword; at call time for a missing ``step`` or ``learning_rate``, a learning rate
        given twice, or a loss already averaged over ``axis_name``.
      TypeError: for a hyperparameter that is not a number, an array or a schedule.
    """
    _check_method(method)
    _check_number("eps", eps, positive=True)
    _check_number("strength", strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=True)
    built_rate = learning_rate  # the call's own ``learning_rate`` keyword shadows the name
    _check_consumed_keywords(loss_fn)

    def gradient_and_aux(params, args, kwargs):
        if axis_name is not None:
            params = _varying(params, axis_name)
        # allow_int: integer leaves (step counters, indices) get float0 gradients and pass.
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux, allow_int=True)(
            params, *args, **kwargs
        )
        if axis_name is not None:
            _check_device_local(params, out[0] if has_aux else out, axis_name)
        return _mean_over(grads, axis_name), out

    def penalized(params, *args, step=None, learning_rate=None, **kwargs):
        if learning_rate is not None and built_rate is not None:
            raise ValueError(
                "learning_rate was given when the wrapper was built; pass it at the call only "
                "when building with learning_rate=None"
            )
        rate = built_rate if learning_rate is None else learning_rate
        if rate is None:
            raise ValueError(
                "learning_rate is required: build with learning_rate=<float or schedule>, or "
                "pass learning_rate=... at each call"
            )
        _check_number("learning_rate", learning_rate, positive=True)  # the built one: checked
        grads, out = gradient_and_aux(params, args, kwargs)
        new_grads = penalized_gradient(
            lambda p: gradient_and_aux(p, args, kwargs)[0],
            params,
            grads,
            strength=_at_step(strength, step, "strength"),
            learning_rate=_at_step(rate, step, "learning_rate"),
            method=method,
            eps=eps,
        )
        if has_aux:
            return (_mean_over(out[0], axis_name), out[1]), new_grads
        return _mean_over(out, axis_name), new_grads

    return penalized


# ----- the optax transform ----------------------------------------------------------------


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
    ``penalty_grad_fn`` needs, and says so. Its state is a step counter only, so it can be used inside ``jax.vmap`` over
    blocks with the state and the parameters unbatched.

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
