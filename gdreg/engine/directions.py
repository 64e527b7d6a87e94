"""Random directions in parameter space, filter-normalized (Li et al., NeurIPS 2018).

Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets": draw a
Gaussian direction d with the shape of the parameters theta and rescale it filter by filter,
d_f <- d_f * ||theta_f|| / ||d_f||, so that a step of length 1 changes every filter by as much
as the filter's own norm. A *filter* is everything that feeds one output channel of a
convolution or one output unit of a dense layer: the slices along the last axis of a Flax
kernel (``[kh, kw, in, out]`` or ``[in, out]``). As in Li et al.'s code (its
``ignore="biasbn"`` option), the direction is zero on biases and BatchNorm scales and offsets
(every parameter with fewer than two axes). Used by the loss landscape
(:mod:`gdreg.tools.landscape`) and the flatness probe (:mod:`gdreg.program.analysis`).
"""

from __future__ import annotations

import jax
import numpy as np

from gdreg.engine.signatures import PyTree


def filter_normalize(direction: PyTree, params: PyTree) -> PyTree:
    """Rescales every filter of ``direction`` to the norm of the matching filter of ``params``.

    Filters are the slices along the last axis of every parameter with two or more axes;
    parameters with fewer axes (biases, BatchNorm) get a zero direction.
    """

    def one(d, p):
        d = np.asarray(d, np.float32)
        p = np.asarray(p, np.float32)
        if p.ndim < 2:
            return np.zeros_like(p)
        axes = tuple(range(p.ndim - 1))
        p_norm = np.sqrt(np.sum(np.square(p), axis=axes, keepdims=True))
        d_norm = np.sqrt(np.sum(np.square(d), axis=axes, keepdims=True))
        return d * (p_norm / (d_norm + 1e-10))

    return jax.tree.map(one, direction, params)


def random_direction(params: PyTree, seed: int, index: int) -> PyTree:
    """A Gaussian direction (one stream per parameter), filter-normalized to ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    draws = [
        np.random.default_rng([seed, index, k]).standard_normal(np.shape(leaf)).astype(np.float32)
        for k, leaf in enumerate(leaves)
    ]
    return filter_normalize(jax.tree.unflatten(treedef, draws), params)
