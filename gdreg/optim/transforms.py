"""Gradient transformations of the reference implementation that optax does not have.

Each is an ``optax.GradientTransformation`` on the full mean gradient (or on one block's
gradient, for the per-block clipping that :mod:`gdreg.program.experiment` composes into the
penalty); :func:`gdreg.optim.chain.optimizer_chain` puts them in the reference's order. Sources: the
authors' implementation of Geiping et al., "Stochastic Training is Not Necessary for Generalization"
(ICLR 2022; github.com/JonasGeiping/fullbatchtraining): ``_modify_gradient_params`` in
``fullbatch/training/training.py`` (norm bias, gradient noise) and the LARS/LARC wrapper in
``fullbatch/training/additional_optimizers/lars.py`` (NVIDIA apex's LARC).

Where optax has the transformation it is used as it is: ``optax.add_decayed_weights`` (with a
mask), ``optax.adaptive_grad_clip`` (the reference's ``gd_agc``), ``optax.adam``/``adamw``,
``optax.sgd``. What is here differs from the nearest optax transformation as follows:

* :func:`add_gradient_noise`/:func:`multiply_gradient_noise`: ``optax.add_noise`` draws
  additive noise of variance ``eta / (1 + t)^gamma`` from a key kept in its state; these draw
  from ``(seed, step)``, and the multiplicative kind has no optax counterpart.
* :func:`scale_by_layerwise_trust_ratio`: ``optax.scale_by_trust_ratio`` (inside
  ``optax.lars``) divides by ``||g + wd * p||``; LARS (You et al. 2017) and the reference
  divide by ``||g|| + wd * ||p||`` and have the clipped variant LARC.
* :func:`add_norm_bias`: no counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

#: A nested structure of arrays (parameters, gradients).
PyTree = Any

#: Streams folded into ``jax.random.key(seed)`` for the two kinds of gradient noise, so that
#: they are independent of each other and of every other draw made from the run's seed.
ADDITIVE_NOISE_STREAM = 0x6E6F6961  # "noia"
MULTIPLICATIVE_NOISE_STREAM = 0x6E6F696D  # "noim"


class StepCountState(NamedTuple):
    """The number of updates made so far (int32), the step at which noise is drawn and a
    learning-rate schedule is evaluated."""

    count: jax.Array


def _init_count(params: PyTree) -> StepCountState:
    del params
    return StepCountState(count=jnp.zeros([], jnp.int32))


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and non-negative, got {value}")


# ----- gradient noise ---------------------------------------------------------------------


def noise_draws(seed: int, stream: int, count: jax.Array, tree: PyTree) -> PyTree:
    """Standard normal draws shaped like ``tree``, a function of ``(seed, stream, count)`` only.

    ``key = fold_in(fold_in(key(seed), stream), count)``, split into one key per leaf (in the
    order of ``jax.tree.leaves``); each leaf's draw has its dtype.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), count)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    keys = jax.random.split(key, len(leaves))
    draws = [
        jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, draws)


def _gradient_noise(
    stddev: float, seed: int, stream: int, combine: Callable[[jax.Array, jax.Array], jax.Array]
) -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        del params
        noise = noise_draws(seed, stream, state.count, updates)
        updates = jax.tree.map(
            lambda g, z: combine(g, (stddev * z).astype(g.dtype)).astype(g.dtype), updates, noise
        )
        return updates, StepCountState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(_init_count, update_fn)


def add_gradient_noise(stddev: float, *, seed: int) -> optax.GradientTransformation:
    """``g <- g + stddev * z``, ``z ~ N(0, I)``: the reference's additive gradient noise
    (``grad_noise.additive``, "as in Langevin dynamics or differential privacy").

    Drawn per entry from ``(seed, step)`` with ``step`` this transformation's update count
    (:func:`noise_draws`), so a run resumed from a checkpoint of the state draws the same noise
    as the uninterrupted run. Per entry: mean ``g``, variance ``stddev^2``.
    """
    _check_non_negative("stddev", stddev)
    return _gradient_noise(stddev, seed, ADDITIVE_NOISE_STREAM, lambda g, n: g + n)


def multiply_gradient_noise(stddev: float, *, seed: int) -> optax.GradientTransformation:
    """``g <- g * (1 + stddev * z)``, ``z ~ N(0, I)``: the reference's multiplicative gradient
    noise (``grad_noise.multiplicative``, "as in Hoffer et al.").

    Drawn like :func:`add_gradient_noise`, from a stream of its own. Per entry: mean ``g``,
    variance ``stddev^2 * g^2``. After additive noise of standard deviation ``a`` (the
    reference's order) the entry has mean ``g`` and variance ``a^2 + stddev^2 * (g^2 + a^2)``.
    """
    _check_non_negative("stddev", stddev)
    return _gradient_noise(stddev, seed, MULTIPLICATIVE_NOISE_STREAM, lambda g, n: g * (1 + n))


# ----- norm bias --------------------------------------------------------------------------


def add_norm_bias(
    strength: float, *, norm: int = 1, target: float = 0.0
) -> optax.GradientTransformation:
    """Adds the gradient of a bias towards parameters of L2 norm ``target`` (Goldblum, Geiping,
    Schwarzschild, Moeller & Goldstein, "Truth or Backpropaganda?", ICLR 2020, Sec. 5).

    With ``d = ||theta||^2 - target^2`` (squared L2 norm over all parameters)::

        norm = 1:  R = strength * |d|        g <- g + 2 * strength * sign(d) * theta
        norm = 2:  R = strength / 2 * d^2    g <- g + 2 * strength * d * theta

    The reference (``norm_bias`` in ``_modify_gradient_params``) adds ``2 * strength * d *
    theta`` for ``norm_type=2``, as here, but ``strength * sign(d)`` to every entry for
    ``norm_type=1``: a constant shift that is not the gradient of a norm term, so the 1-norm
    term here is the gradient of ``strength * |d|`` instead.
    """
    _check_non_negative("strength", strength)
    _check_non_negative("target", target)
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("params are required by the norm bias")
        difference = optax.tree.norm(params, squared=True) - target**2
        factor = 2 * strength * (jnp.sign(difference) if norm == 1 else difference)
        updates = jax.tree.map(
            lambda g, p: (g + factor.astype(g.dtype) * p.astype(g.dtype)).astype(g.dtype),
            updates,
            params,
        )
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ----- LARS and LARC ----------------------------------------------------------------------


def _resolve_mask(mask: Any, params: PyTree) -> PyTree:
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask


def scale_by_layerwise_trust_ratio(
    *,
    trust_coefficient: float = 0.02,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    clip: bool = False,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
    """LARS (You, Gitman & Ginsburg 2017, arXiv 1708.03888) and its clipped variant LARC, as
    the reference wraps any optimizer (``additional_optimizers/lars.py``, NVIDIA apex's LARC).

    For every parameter array ``p`` (a "layer") with gradient ``g`` and weight decay ``wd``
    (0 where ``weight_decay_mask`` is False)::

        ratio = trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps)
        LARC:   ratio = min(ratio / lr_t, 1)             (1 while lr_t = 0)
        g    <- (g + wd * p) * ratio                     if ||p|| > 0 and ||g|| > 0, else g

    and the optimizer that follows runs without weight decay (the wrapper absorbs it): LARS
    scales the step ``lr_t * g`` by the trust ratio; LARC makes it ``min(ratio, lr_t) * g``.
    ``lr_t`` is ``learning_rate`` (the run's schedule) at this transformation's step count.
    With ``weight_decay = 0`` LARS is ``optax.scale_by_trust_ratio(trust_coefficient, eps=eps)``.
    """
    if not trust_coefficient > 0:
        raise ValueError(f"trust_coefficient must be positive, got {trust_coefficient}")
    _check_non_negative("eps", eps)
    _check_non_negative("weight_decay", weight_decay)
    if clip and learning_rate is None:
        raise ValueError("learning_rate is required for LARC (clip=True)")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("params are required by the trust ratio")
        mask = _resolve_mask(weight_decay_mask, params)
        rate = None
        if clip:
            rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
            rate = jnp.asarray(rate)

        def scale(g, p, decayed):
            decay = weight_decay * jnp.asarray(decayed, g.dtype)
            param_norm = jnp.linalg.norm(p.astype(g.dtype).ravel())
            grad_norm = jnp.linalg.norm(g.ravel())
            ratio = trust_coefficient * param_norm / (grad_norm + decay * param_norm + eps)
            if clip:
                r = rate.astype(g.dtype)
                ratio = jnp.where(r > 0, jnp.minimum(ratio / jnp.where(r > 0, r, 1), 1), 1)
            scaled = (g + decay * p.astype(g.dtype)) * ratio.astype(g.dtype)
            return jnp.where((param_norm > 0) & (grad_norm > 0), scaled, g).astype(g.dtype)

        updates = jax.tree.map(scale, updates, params, mask)
        return updates, StepCountState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(_init_count, update_fn)


# ----- parameter masks ----------------------------------------------------------------------


def kernel_mask(params: PyTree) -> PyTree:
    """True for every parameter with at least two dimensions: the kernels of dense and
    convolution layers; False for biases, BatchNorm scales and offsets (all 1-D) and scalars.

    The reference's ``only_linear_layers_weight_decay`` excludes parameters whose name matches
    ``bias|gain`` (NFNet names); with torch's BatchNorm, whose scale is named ``weight``, it
    still decays BatchNorm scales, which this mask does not.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def output_layer_mask(num_classes: int) -> Callable[[PyTree], PyTree]:
    """A mask function: False for the parameters of the output layer, True for all others.

    The output layer is every module whose ``kernel`` is 2-D with ``num_classes`` output
    features (Flax ``Dense``: ``[in, out]``); its bias is excluded with it. A hidden dense layer
    of exactly ``num_classes`` units would be excluded too. The reference's ``gd_agc`` leaves its
    classifier (named ``linear``) unclipped, as Brock et al. (2021) do.
    """

    def mask(params: PyTree) -> PyTree:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        heads = [
            path[:-1]
            for path, leaf in leaves
            if _key_name(path[-1]) == "kernel"
            and jnp.ndim(leaf) == 2
            and jnp.shape(leaf)[-1] == num_classes
        ]
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(path[: len(head)] == head for head in heads), params
        )

    return mask


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
