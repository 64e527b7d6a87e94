"""The penalty's closed form for the tests: ``g + strength * lr / 4 * H g`` with the explicit
Hessian of the flattened parameters (Geiping et al., ICLR 2022), and pytree comparison."""

from __future__ import annotations

import jax
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
