"""gdreg: full-batch gradient descent with explicit gradient regularization in JAX.

Reimplements Geiping, Goldblum, Pope, Moeller, Goldstein, "Stochastic Training is Not
Necessary for Generalization", ICLR 2022 (arXiv 2109.14119).

The public API is the penalty (:mod:`gdreg.penalty`: the transform, the drop-in and its Flax
helpers); it needs only jax, flax and optax. The packages, each importing only those below it
(docs/architecture.md):

    tools/     report, landscape, precision, bench: programs around finished runs
    program/   the training program: config, experiment, loop, checkpoints, run directory
    engine/    the sharded full-batch gradient, the training step, evaluation, loop shapes
    optim/ models/ data/   the optax chain; the model zoo; datasets and augmentation
    penalty/   the gradient-norm penalty

Names are imported on first use, so that the JAX-free modules (the config schema, the run
directory, and the report built on them) load without JAX.
"""

from __future__ import annotations

import importlib

from gdreg.penalty import __all__ as _PENALTY_NAMES

#: The penalty's public names (:mod:`gdreg.penalty`), re-exported.
__all__ = list(_PENALTY_NAMES)
_PACKAGES = ("penalty", "optim", "models", "data", "engine", "program", "tools")


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("gdreg.penalty"), name)
    if name in _PACKAGES:  # ``import gdreg; gdreg.penalty`` works too
        return importlib.import_module(f"gdreg.{name}")
    raise AttributeError(f"module 'gdreg' has no attribute {name!r}")
