"""The gradient-norm penalty's math: Hessian-vector products and the penalized gradient.

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

Finite differences are not the exact Hessian on piecewise-linear networks: for ReLU networks the
gradient jumps where units switch on or off, and a difference over a step of L2 length ``eps``
sees those jumps, so ``"forward"``/``"central"`` at ``eps = 1e-2`` and ``"jvp"`` (the Hessian of
the almost-everywhere smooth pieces) differ by a factor of several, more as ``eps`` shrinks.
They are two different regularizers there; the paper's numbers come from forward differences at
``eps = 1e-2``. With smooth activations all three agree to ``O(eps)``.

The helpers below (argument checks, pytree and device-axis helpers) are shared with
:mod:`gdreg.penalty.dropin` and :mod:`gdreg.penalty.transform`.
"""

from __future__ import annotations

import atexit
import logging
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdreg.penalty import METHODS

#: A nested structure of arrays (parameters, gradients).
PyTree = Any
GradFn = Callable[[PyTree], Any]


# ----- argument checks (Python numbers only: traced hyperparameters are not inspected) ----------


def _is_python_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    """Rejects a bad number or a non-number; traced values and schedules pass unchecked here.

    Traced values (a schedule evaluated at a traced step, ``optax.inject_hyperparams``) are
    checked at run time by :func:`_fail_if` where the callers ask for it.
    """
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


# ----- errors found from values at run time ----------------------------------------------------


class PenaltyCheckError(ValueError):
    """gdreg's error for a misuse seen in values (under ``jit``, raised in a host callback)."""


class _QuietOwnErrors(logging.Filter):
    # JAX logs the traceback of any exception raised in a callback before it raises it again
    # as a JaxRuntimeError; for gdreg's own errors the error itself says everything, once.
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, PenaltyCheckError)


logging.getLogger("jax._src.callback").addFilter(_QuietOwnErrors())

#: Set when a check failed inside a compiled program (see ``_forget_reported_failures``).
_FAILED_IN_CALLBACK: list[bool] = []


def _forget_reported_failures() -> None:
    """At exit, drops JAX's record of the programs that gdreg's checks stopped.

    JAX keeps, per device, the runtime token of the last program that ran a host callback and
    waits for them at exit, printing any failure a second time ("Exception ignored in atexit
    callback"). A failed check has already reached the caller as that program's error, so
    exactly those tokens are dropped (registered after JAX's own handlers, this runs first).
    """
    if not _FAILED_IN_CALLBACK:
        return
    try:
        from jax._src import dispatch  # private: no public API reaches these tokens

        tokens = dispatch.runtime_tokens.output_runtime_tokens
        for device, token in list(tokens.items()):
            try:
                token.block_until_ready()
            except Exception as error:  # the program's failure, as JAX would print it
                if PenaltyCheckError.__name__ in str(error):
                    del tokens[device]
    except Exception:  # another JAX: it prints, as it would without gdreg
        return


atexit.register(_forget_reported_failures)


def _is_traced(*values: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def _fail_if(bad: Any, message: Callable[..., str], *values: Any) -> Any:
    """Raises ``PenaltyCheckError(message(*values))`` (a ValueError) where ``bad`` holds.

    With concrete values the error is raised now. Under ``jit`` (or inside ``lax.cond``, which
    traces even eager calls) values exist only at run time, and the only way a compiled program
    can stop is a host callback: it runs only when ``bad`` holds (``lax.cond``), so a passing
    check costs one scalar test. JAX hands the error to the caller as a ``JaxRuntimeError``
    whose message ends with this one (no JAX API keeps the exception's type); it is a
    ``pure_callback`` (no effect token), JAX's own log of it is filtered out, and the tokens
    JAX keeps of multi-device programs with callbacks are dropped at exit
    (``_forget_reported_failures``), so the message is shown once. ``values`` are scalars for
    the message; under ``vmap`` the first failing element's are shown.

    Returns:
      ``False`` when concrete, else a traced boolean that the caller must fold into its result
      (e.g. ``jnp.where(failed, nan, x)``), so that the callback is not pruned as unused.
    """
    bad = jax.lax.stop_gradient(jnp.asarray(bad))
    values = tuple(jax.lax.stop_gradient(jnp.asarray(v)) for v in values)
    if not _is_traced(bad, values):
        if bool(bad):
            raise PenaltyCheckError(message(*(np.asarray(v).item() for v in values)))
        return False

    def report(flag, *numbers):
        flag = np.asarray(flag)
        if np.any(flag):
            first = int(np.argmax(flag.ravel()))
            shown = [np.broadcast_to(np.asarray(n), flag.shape).ravel()[first] for n in numbers]
            _FAILED_IN_CALLBACK.append(True)
            raise PenaltyCheckError(message(*(n.item() for n in shown)))
        return flag

    def call_back():
        shape = jax.ShapeDtypeStruct(bad.shape, jnp.bool_)
        return jax.pure_callback(report, shape, bad, *values, vmap_method="broadcast_all")

    return jax.lax.cond(bad, call_back, lambda: jnp.zeros_like(bad))


def _either(a: Any, b: Any) -> Any:
    """The disjunction of two failure flags of :func:`_fail_if` (False: no check made)."""
    if a is False:
        return b
    return a if b is False else a | b


def _rate_error(name: str) -> Callable[[float], str]:
    return lambda value: f"{name} must be finite and >= 0, got {name}={value!r}"


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


def _at_step(value: optax.ScalarOrSchedule, step: Any, name: str) -> Any:
    if not callable(value):
        return value
    if step is None:
        raise ValueError(f"{name} is a schedule: pass step=<the optimizer step> to the call")
    return value(step)


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
      ValueError: for an unknown ``method``, ``eps <= 0``, a ``grad_fn`` output or ``grads``
        not shaped like ``params``, or ``"jvp"`` through a ``jax.custom_vjp`` function (which
        has no forward-mode derivative: finite differences need only reverse mode).
    """
    result, aux, _ = _hessian_vector_product(
        grad_fn, params, vector, method=method, eps=eps, grads=grads, has_aux=has_aux
    )
    return (result, aux) if has_aux else result


def _jvp(evaluate: Callable, x0: list[jax.Array], v: list[jax.Array]):
    try:
        return jax.jvp(evaluate, (x0,), (v,), has_aux=True)
    except TypeError as error:
        if "custom_vjp" not in str(error):
            raise
        raise ValueError(
            'method="jvp" differentiates the gradient in forward mode, and the loss uses a '
            "jax.custom_vjp function that JAX cannot differentiate in forward mode (JAX: "
            f'{str(error).splitlines()[0]}). Use method="forward" (or "central"): finite '
            "differences of gradients need reverse mode only."
        ) from None


def _hessian_vector_product(
    grad_fn: GradFn,
    params: PyTree,
    vector: PyTree,
    *,
    method: str,
    eps: float | jax.Array,
    grads: PyTree | None,
    has_aux: bool,
) -> tuple[PyTree, Any, list[jax.Array] | None]:
    """:func:`hessian_vector_product`, and ``grad_fn(params)``'s floating leaves where computed.

    The third result is the gradient at ``params`` when this computation evaluated it anyway
    (the primal output of ``"jvp"``, the base point of ``"forward"`` without ``grads``), in the
    compute dtypes, else None: what run-time checks compare the incoming gradient with.
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

    base_out = None
    if method == "jvp":
        base_out, product, aux = _jvp(evaluate, x0, v)
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
            base_out = None if given else base
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
    return jax.tree.unflatten(treedef, leaves), aux, base_out


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
      learning_rate: the optimizer's learning rate at this step, a scalar >= 0 (0: no
        penalty, as at the start of a warmup). Traced values are not checked here.
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
    result, aux, _ = _penalized_gradient(
        grad_fn,
        params,
        grads,
        strength=strength,
        learning_rate=learning_rate,
        method=method,
        eps=eps,
        full_grads=full_grads,
        full_strength=full_strength,
        forward_base=forward_base,
        has_aux=has_aux,
    )
    return (result, aux) if has_aux else result


def _penalized_gradient(
    grad_fn: GradFn,
    params: PyTree,
    grads: PyTree,
    *,
    strength: float | jax.Array,
    learning_rate: float | jax.Array,
    method: str,
    eps: float | jax.Array,
    full_grads: PyTree | None = None,
    full_strength: float | jax.Array | None = None,
    forward_base: PyTree | None = None,
    has_aux: bool = False,
    guard: Callable[[list[jax.Array] | None], Any] | None = None,
) -> tuple[PyTree, Any, list[jax.Array] | None]:
    """:func:`penalized_gradient` with the callers' run-time checks.

    ``guard(base)`` receives the gradient at ``params`` where the product computed it anyway
    (see :func:`_hessian_vector_product`; None otherwise) and returns a traced boolean "failed"
    (from :func:`_fail_if`) or False; a failure makes the added term NaN, which keeps the
    check's callback in the program. Returns ``(g', aux, base)``.
    """
    _check_number("strength", strength, positive=False)
    _check_number("full_strength", full_strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=False)
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
    product, aux, computed = _hessian_vector_product(
        grad_fn, params_like, vector, method=method, eps=eps, grads=base, has_aux=has_aux
    )
    coef = jnp.asarray(learning_rate) / 4
    failed = False if guard is None else guard(computed)
    if failed is not False:
        coef = jnp.where(failed, jnp.nan, coef)

    def add(g, h):
        if not _is_float(g):
            return g
        return (jnp.asarray(g).astype(h.dtype) + coef.astype(h.dtype) * h).astype(g.dtype)

    result = jax.tree.map(add, grads, _match_structure(product, grads, "the product"))
    return result, aux, computed
