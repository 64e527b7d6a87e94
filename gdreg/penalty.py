"""Explicit gradient-norm penalty as an Optax gradient transformation.

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
of gradients (or exactly, by forward-over-reverse autodiff).

The public pieces are :func:`hessian_vector_product`, a pure helper, and
:func:`gradient_norm_penalty`, an ``optax.GradientTransformationExtraArgs`` that adds the
penalty's gradient to the incoming gradient of one block.
"""

from __future__ import annotations

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
]

GradFn = Callable[[PyTree], PyTree]

#: Ways to compute the Hessian-vector product, see :func:`hessian_vector_product`.
METHODS: tuple[str, ...] = ("forward", "central", "jvp")


class GradientNormPenaltyState(NamedTuple):
    """State of :func:`gradient_norm_penalty`.

    Attributes:
      count: int32 scalar, the number of updates made so far; a learning-rate schedule is
        evaluated at this step.
    """

    count: jax.Array


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")


def _check_eps(eps: float) -> None:
    if not eps > 0:  # also rejects NaN
        raise ValueError(f"eps must be > 0, got eps={eps!r}")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    # bfloat16/float16 cannot represent a perturbation of relative size ~1e-3 of a weight, nor
    # the small difference of two nearby gradients, so everything runs in at least float32.
    return jnp.promote_types(jnp.result_type(*(jnp.asarray(a).dtype for a in arrays)), jnp.float32)


def _global_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*(leaf.dtype for leaf in leaves))
    leaves = [leaf.astype(dtype) for leaf in leaves]
    # Scaling by the largest entry keeps the squares from overflowing (entries above ~1e19 in
    # float32, which would make eps_n zero and the quotient NaN) or underflowing.
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf), initial=0) for leaf in leaves]))
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return scale * jnp.sqrt(sum(jnp.sum(jnp.square(leaf / scale)) for leaf in leaves))


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


def hessian_vector_product(
    grad_fn: GradFn,
    params: PyTree,
    vector: PyTree,
    *,
    method: str = "forward",
    eps: float = 1e-2,
    grads: PyTree | None = None,
) -> PyTree:
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

    Every leaf is handled in at least float32 (bfloat16/float16 leaves are upcast): the
    perturbed parameters passed to ``grad_fn``, the vector, the difference of gradients and the
    division. A zero vector gives a zero product (never NaN), although ``grad_fn`` is still
    evaluated so that the function traces the same way for any input value.

    Args:
      grad_fn: maps parameters to the gradient of a fixed loss (on fixed data) at those
        parameters, as a pytree shaped like ``params``.
      params: the point at which the Hessian is taken.
      vector: pytree with the structure and shapes of ``params``.
      method: ``"forward"``, ``"central"`` or ``"jvp"``.
      eps: L2 length of the finite-difference step, > 0.
      grads: ``grad_fn(params)`` if already known, which saves one evaluation for ``"forward"``.

    Returns:
      ``H v`` with the structure of ``params``; each leaf in the dtype promoted from the
      parameter, the vector leaf and float32 (so float32 for bfloat16 inputs).

    Raises:
      ValueError: for an unknown ``method`` or ``eps <= 0``.
    """
    _check_method(method)
    _check_eps(eps)
    dtypes = jax.tree.map(_compute_dtype, params, vector)
    params_c = jax.tree.map(lambda p, d: jnp.asarray(p).astype(d), params, dtypes)
    vector_c = jax.tree.map(lambda v, d: jnp.asarray(v).astype(d), vector, dtypes)

    def evaluate(at: PyTree) -> PyTree:
        out = _match_structure(grad_fn(at), params_c, "the output of grad_fn")
        return jax.tree.map(lambda g, d: jnp.asarray(g).astype(d), out, dtypes)

    if method == "jvp":
        _, tangent = jax.jvp(evaluate, (params_c,), (vector_c,))
        return tangent

    norm = _global_norm(vector_c)
    nonzero = norm > 0
    # The guard keeps eps_n finite for a zero vector; the product is then masked to zero.
    eps_n = eps / jnp.where(nonzero, norm, jnp.ones_like(norm))

    def shifted(scale: float) -> PyTree:
        return jax.tree.map(
            lambda p, v: p + (scale * eps_n * v).astype(p.dtype), params_c, vector_c
        )

    if method == "forward":
        if grads is None:
            base = evaluate(params_c)
        else:
            base = _match_structure(grads, params_c, "grads")
            base = jax.tree.map(lambda g, d: jnp.asarray(g).astype(d), base, dtypes)
        diff = jax.tree.map(jnp.subtract, evaluate(shifted(1.0)), base)
    else:  # central
        diff = jax.tree.map(jnp.subtract, evaluate(shifted(0.5)), evaluate(shifted(-0.5)))

    return jax.tree.map(
        lambda d: jnp.where(nonzero, d / eps_n.astype(d.dtype), jnp.zeros_like(d)), diff
    )


def gradient_norm_penalty(
    strength: float = 0.5,
    learning_rate: float | optax.Schedule = 1.0,
    eps: float = 1e-2,
    method: str = "forward",
    full_strength: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Adds the gradient of an explicit gradient-norm penalty to the gradient of one block.

    For the gradient ``g = grad L_B(theta)`` of a loss on one block (minibatch) ``B`` this
    returns, following Geiping et al. (ICLR 2022, arXiv 2109.14119: the explicit regularizer
    that stands in for SGD's implicit one, and the authors' implementation of its gradient)::

        v  = strength * g  [+ full_strength * full_grads]
        g' = g + (lr_t / 4) * H_B v

    with ``H_B`` the Hessian of ``L_B`` at ``theta`` and ``lr_t`` the learning rate at the
    current step. With ``full_strength = 0`` the added term is ``strength * lr_t / 4 * H_B g``,
    the gradient of ``strength * lr_t / 8 * ||grad L_B||^2``, so ``g'`` is the gradient of::

        L_B(theta) + strength * lr_t / 8 * || grad L_B(theta) ||^2

    ``strength = 2`` gives the implicit regularizer of SGD with step ``tau = lr_t``,
    ``tau / 4 * ||grad L_B||^2`` (Smith et al., ICLR 2021; Barrett & Dherin, ICLR 2021);
    ``strength = 0.5`` (the default) reproduces the paper's runs ("block_strength" 0.5).
    Averaging ``g'`` over the blocks ``B`` gives the full-batch regularized gradient. The
    optional second vector ``full_grads`` (the full-batch mean gradient; "acc_strength" in
    the reference, 0 in the paper) is added to ``v`` with weight ``full_strength``.

    ``H_B v`` comes from :func:`hessian_vector_product`: ``"forward"`` differences cost one
    extra gradient evaluation per block (the incoming ``g`` is the base point), ``"central"``
    two, ``"jvp"`` one forward-over-reverse pass and is exact. All of it runs in at least
    float32; the result is cast back to each gradient leaf's dtype. With bfloat16 gradients the
    forward base point ``g`` carries bfloat16 rounding, which the division by ``eps_n`` amplifies
    (relative error about ``2^-9 ||g|| ||v|| / (eps ||H v||)``); ``"central"`` or ``"jvp"``
    avoid this.

    Place this first in an ``optax.chain`` (before clipping, weight decay or momentum), since it
    needs the raw gradient; ``optax.chain`` passes the keyword arguments below through to it.
    The state is a step counter only, so the transformation can be used inside ``jax.vmap``
    over blocks with the state and the parameters unbatched.

    Args:
      strength: weight ``alpha >= 0`` of the block gradient in ``v``.
      learning_rate: the optimizer's learning rate ``lr_t``, a float or an Optax schedule,
        evaluated at the step count of this transformation's state.
      eps: L2 length ``> 0`` of the finite-difference step.
      method: ``"forward"``, ``"central"`` or ``"jvp"``.
      full_strength: weight ``beta >= 0`` of ``full_grads`` in ``v``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *,
      grad_fn=None, full_grads=None, **extra_args)`` needs ``params``, ``grad_fn`` (parameters
      to the gradient of the same loss on the same block, ``grad_fn(params) == grads``) and,
      when ``full_strength > 0``, ``full_grads``; other keyword arguments are ignored. With
      ``strength == full_strength == 0`` it returns the gradients unchanged without calling
      ``grad_fn``.

    Raises:
      ValueError: at construction for an unknown ``method``, negative ``strength`` or
        ``full_strength``, or ``eps <= 0``; at update time when ``grad_fn``, ``params`` or a
        needed ``full_grads`` is missing.
    """
    _check_method(method)
    _check_eps(eps)
    strength = float(strength)
    full_strength = float(full_strength)
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got strength={strength!r}")
    if not full_strength >= 0:
        raise ValueError(f"full_strength must be >= 0, got full_strength={full_strength!r}")
    active = strength > 0 or full_strength > 0

    def init_fn(params: PyTree) -> GradientNormPenaltyState:
        del params
        return GradientNormPenaltyState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: PyTree,
        state: GradientNormPenaltyState,
        params: PyTree | None = None,
        *,
        grad_fn: GradFn | None = None,
        full_grads: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, GradientNormPenaltyState]:
        del extra_args  # other transformations' arguments, routed here by optax.chain
        new_state = GradientNormPenaltyState(count=optax.safe_increment(state.count))
        if not active:
            return updates, new_state
        if grad_fn is None:
            raise ValueError(
                "grad_fn is required: pass grad_fn=<params -> gradient of the same loss on the "
                "same data> to update()"
            )
        if params is None:
            raise ValueError("params is required by gradient_norm_penalty's update()")
        if full_strength > 0 and full_grads is None:
            raise ValueError(f"full_grads is required when full_strength={full_strength} > 0")

        lr_t = learning_rate(state.count) if callable(learning_rate) else learning_rate

        vector = jax.tree.map(lambda g: strength * g.astype(_compute_dtype(g)), updates)
        if full_strength > 0:
            full = _match_structure(full_grads, updates, "full_grads")
            vector = jax.tree.map(
                lambda v, f: v + full_strength * jnp.asarray(f).astype(v.dtype), vector, full
            )
        hvp = hessian_vector_product(grad_fn, params, vector, method=method, eps=eps, grads=updates)
        hvp = _match_structure(hvp, updates, "the Hessian-vector product")
        coef = jnp.asarray(lr_t) / 4
        new_updates = jax.tree.map(
            lambda g, h: (g.astype(h.dtype) + coef.astype(h.dtype) * h).astype(g.dtype),
            updates,
            hvp,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
