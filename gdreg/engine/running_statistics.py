"""How the BatchNorm statistics of many forward passes become the running statistics.

gdreg's BatchNorm layers (:class:`gdreg.models.layers.BatchNorm`) report each train-mode
forward pass's batch statistics ``s`` (mean and unbiased variance per channel); the training
engine (:mod:`gdreg.engine.fullbatch`) turns the statistics of all passes of a step into the running
statistics ``r`` that evaluation uses. The rules (``train.batchnorm_statistics``):

``"reference"``
    The reference implementation's rule (JonasGeiping/fullbatchtraining,
    ``fullbatch/training/training.py`` with PyTorch's ``BatchNorm2d``, momentum ``m = 0.1``):
    every train-mode forward pass updates ``r <- (1 - m) r + m s``, one after another, in the
    order the passes run. Over ``K`` passes of a step that is the linear recurrence::

        r_K = (1 - m)^K r_0 + sum_{k=0}^{K-1} m (1 - m)^(K-1-k) s_k

    so every pass can be weighted by its global position ``k`` wherever it runs, and one sum
    across devices gives the sequential result (:func:`sequential_weight`, :func:`decay`).
    The passes of one step, in the reference's order: for each block, the gradient pass at
    ``theta``, then the penalty's passes at perturbed weights (forward differences: one at
    ``theta + eps_n v``; central differences: ``theta + eps_n v / 2``, then
    ``theta - eps_n v / 2``); the exact ``jvp`` penalty (the reference's double backprop) and a
    switched-off penalty make no extra pass. With ``penalty.full_strength > 0`` the first pass
    over all blocks (the plain gradient) comes before them, as in the reference. This is the
    reference run in one process; in its distributed mode every rank keeps its own chain over
    its share of the blocks and the buffers are averaged at evaluation.
``"mean"``
    One momentum step per full-batch step with the mean of the gradient passes' block
    statistics: ``r <- (1 - m) r + m mean_B s_B``. Independent of block order (gdreg's rule
    before the reference's was matched, then with the biased variance); the perturbed passes
    do not count.
``"recompute"``
    Training leaves the running statistics alone; before every evaluation they are replaced by
    the statistics of the whole training set at the current weights
    (:func:`gdreg.program.experiment.recompute_statistics`): at every layer the mean and unbiased
    variance over all the set's pixels of that layer's input, with every earlier layer
    normalized by its own whole-set statistics. They are the statistics of one train-mode
    forward pass over the whole set as a single batch (with PyTorch's unbiased variance), so
    the network in eval mode computes on the training set what that pass computes, up to the
    variance's factor n / (n - 1) (n: the set's pixels per channel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from gdreg.engine.signatures import PyTree


#: PyTorch's BatchNorm momentum (the weight of the new batch statistics).
TORCH_MOMENTUM = 0.1


def sequential_weight(position: jax.Array, total: jax.Array, momentum: float) -> jax.Array:
    """``m (1 - m)^(K - 1 - k)``: the weight of pass ``k`` of ``K`` in the sequential rule."""
    base = jnp.asarray(1.0 - momentum, position.dtype)
    return momentum * jnp.power(base, total - 1 - position)


def decay(total: jax.Array, momentum: float) -> jax.Array:
    """``(1 - m)^K``: what is left of the running statistics after ``K`` sequential passes."""
    return jnp.power(jnp.asarray(1.0 - momentum, total.dtype), total)


def combine(old: PyTree, weighted_sum: PyTree, old_weight: jax.Array) -> PyTree:
    """``old_weight * old + weighted_sum``, leaf by leaf, in the dtype of ``weighted_sum``."""
    return jax.tree.map(
        lambda r, s: old_weight.astype(s.dtype) * jnp.asarray(r, s.dtype) + s, old, weighted_sum
    )
