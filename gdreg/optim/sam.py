"""Sharpness-aware minimization on the full-batch gradient, as a pure function of callables.

An optax transformation sees one gradient per update, so SAM is a function of
``gradient_fn(params)``, the full-batch mean gradient at ``params`` (an engine call), that the
training step calls around its engine; it runs eagerly, on replicated or host arrays alike.

:func:`sam_gradient`: sharpness-aware minimization (Foret, Kleiner, Mobahi & Neyshabur,
"Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021), as the
reference's ``SAM`` wrapper (``fullbatch/training/additional_optimizers/sam.py``, after
github.com/davda54/sam) takes it: one ascent step of length ``rho``, then the gradient there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

#: A nested structure of arrays (parameters, gradients).
PyTree = Any

#: The reference's SAM divides by ``||g|| + 1e-12``.
SAM_EPSILON = 1e-12


# ----- SAM --------------------------------------------------------------------------------


@jax.jit
def _perturbation(grads: PyTree, rho: jax.Array) -> PyTree:
    norm = optax.tree.norm(grads)
    return jax.tree.map(lambda g: (rho * g / (norm + SAM_EPSILON)).astype(g.dtype), grads)


def sam_perturbation(grads: PyTree, rho: float) -> PyTree:
    """``e = rho * g / (||g|| + 1e-12)``: the ascent step of SAM (global L2 norm over all
    leaves; the reference's ``first_step``)."""
    if not rho >= 0:
        raise ValueError(f"rho must be non-negative, got {rho}")
    return _perturbation(grads, jnp.asarray(rho))


def sam_gradient(
    gradient_fn: Callable[[PyTree], Any],
    params: PyTree,
    rho: float,
    *,
    grads: PyTree | None = None,
    has_aux: bool = False,
) -> Any:
    """The SAM gradient ``gradient_fn(params + e)``, ``e = rho * g / (||g|| + 1e-12)``,
    ``g = gradient_fn(params)``.

    The gradient of ``max_{||e|| <= rho} L(params + e)`` to first order in ``rho`` (Foret et
    al. 2021, Eq. 3), which the optimizer then applies at ``params`` (the reference's
    ``second_step`` moves back to ``params`` and steps with this gradient). For a quadratic
    ``L = 1/2 x^T A x - b^T x`` it is ``g + rho * A g / ||g||``.

    Args:
      gradient_fn: parameters -> the full-batch mean gradient there (with ``has_aux``, the
        pair ``(gradient, aux)``, e.g. an engine call returning its result as ``aux``).
      params: the current parameters.
      rho: the radius of the ascent step, >= 0 (the reference's preset: 0.05).
      grads: ``gradient_fn(params)`` if the loop already has it (saves that evaluation; it
        must be the gradient the ascent should follow).
      has_aux: whether ``gradient_fn`` returns ``(gradient, aux)``.

    Returns:
      The gradient at ``params + e`` (with ``has_aux``, ``(gradient, aux)`` of that second
      evaluation). One evaluation of ``gradient_fn`` when ``grads`` is given, two otherwise.
    """
    if grads is None:
        first = gradient_fn(params)
        grads = first[0] if has_aux else first
    perturbation = sam_perturbation(grads, rho)
    return gradient_fn(jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, perturbation))
