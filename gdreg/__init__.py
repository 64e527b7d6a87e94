"""gdreg: full-batch gradient descent with explicit gradient regularization in JAX.

Reimplements Geiping, Goldblum, Pope, Moeller, Goldstein, "Stochastic Training is Not
Necessary for Generalization", ICLR 2022 (arXiv 2109.14119).
"""

from gdreg.penalty import GradientNormPenaltyState, gradient_norm_penalty

__all__ = ["GradientNormPenaltyState", "gradient_norm_penalty"]
