"""gdreg: full-batch gradient descent with explicit gradient regularization in JAX.

Reimplements Geiping, Goldblum, Pope, Moeller, Goldstein, "Stochastic Training is Not
Necessary for Generalization", ICLR 2022 (arXiv 2109.14119).

The public API is the penalty transform; it is imported on first use, so that the JAX-free
modules (``gdreg.config``, ``gdreg.rundir``, and the report built on them) load without JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdreg.penalty import GradientNormPenaltyState, gradient_norm_penalty

__all__ = ["GradientNormPenaltyState", "gradient_norm_penalty"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("gdreg.penalty"), name)
    if name == "penalty":  # ``import gdreg; gdreg.penalty`` as before the import was lazy
        return importlib.import_module("gdreg.penalty")
    raise AttributeError(f"module 'gdreg' has no attribute {name!r}")
