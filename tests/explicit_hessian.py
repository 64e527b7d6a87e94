"""The penalty's closed form for the tests: ``g + strength * lr / 4 * H g`` with the explicit
Hessian of the flattened parameters (Geiping et al., ICLR 2022), pytree comparison, and the
small smooth problem the drop-in's tests share."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def penalized_reference(loss_of_params, params, *, strength, lr):
    """``g + strength * lr / 4 * H g`` of ``loss_of_params`` at ``params`` (any pytree), from
    ``jax.hessian`` of the flattened parameters: the gradient of
    ``L + strength * lr / 8 * ||grad L||^2``."""
    flat, unravel = ravel_pytree(params)

    def flat_loss(z):
        return loss_of_params(unravel(z))

    g = jax.grad(flat_loss)(flat)
    return unravel(g + strength * lr / 4 * jax.hessian(flat_loss)(flat) @ g)


def assert_tree_close(actual, expected, rtol, atol=0.0):
    """``np.testing.assert_allclose`` over every leaf of two pytrees of the same structure."""
    actual_flat, _ = ravel_pytree(jax.tree.map(np.asarray, actual))
    expected_flat, _ = ravel_pytree(jax.tree.map(np.asarray, expected))
    np.testing.assert_allclose(np.asarray(actual_flat), np.asarray(expected_flat), rtol, atol)


class TanhMLP(nn.Module):
    """3 -> 6 -> 2 with a tanh: smooth, so the closed form holds to round-off."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.tanh(nn.Dense(6)(x)))


def regression(n=16, features=3, seed=0, dtype=np.float64):
    """``n`` standard-normal inputs and smooth 2-dimensional targets."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(dtype)
    return x, np.sin(x @ rng.standard_normal((features, 2))).astype(dtype)


def tanh_mlp_problem(dtype=np.float64):
    """``(loss_fn(params, x, y), params, x, y)``: :class:`TanhMLP`'s mean squared error on
    :func:`regression`, with parameters large enough for a curved loss."""
    x, y = regression(dtype=dtype)
    model = TanhMLP()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: (0.7 * rng.standard_normal(s.shape)).astype(dtype), shapes)

    def loss_fn(p, xb, yb):
        return jnp.mean((model.apply(p, xb) - yb) ** 2)

    return loss_fn, params, x, y
