"""Optimization: the optax chain of a config, schedules, transforms, SAM and line search.

Modules (each with one concern): :mod:`.chain` (the optimizers as optax chains and the
reference's clipping), :mod:`.schedules` (learning-rate schedules counted in epochs),
:mod:`.transforms` (gradient transformations optax lacks: noise, norm bias, LARS/LARC, masks),
:mod:`.sam` and :mod:`.line_search` (steps that evaluate the full-batch objective more than
once). The names below are the choices of the config fields these modules own; they are
declared here, without importing JAX, so that the config schema can list them.
"""

import math

#: ``optim.schedule``.
SCHEDULES = (
    "warmup_cosine",
    "warmup_constant",
    "warmup_linear",
    "warmup_step",
    "warmup_exponential",
)
#: ``optim.name``: the reference's ``optim`` choices that gdreg runs (``config/hyp/optim``).
OPTIMIZERS = ("sgd", "adam", "adamw", "gd_agc")
#: ``optim.modification``: the reference's ``optim_modification`` choices. ``sam`` changes
#: no optax chain: the training step makes its extra gradient evaluation
#: (:func:`gdreg.optim.sam.sam_gradient`).
MODIFICATIONS = ("none", "lars", "larc", "sam")
#: ``optim.clip_norm_type``: the reference's ``grad_clip_norm``, 2 or infinity.
CLIP_NORM_TYPES = {"2": 2.0, "inf": math.inf}
#: ``optim.line_search``.
LINE_SEARCHES = ("none", "armijo")
