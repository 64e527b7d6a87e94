"""Learning-rate schedules of the reference implementation, counted in epochs.

Geiping et al. (ICLR 2022), Sec. 3 and the authors' configuration: a linear warmup followed by a
cosine decay whose horizon is counted from the end of the warmup and may exceed the run
("cosine-4000" over a 3000-step run); the other schedules of ``config/hyp/`` are the choices of
:data:`gdreg.optim.SCHEDULES`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

from gdreg.optim import SCHEDULES


def learning_rate_schedule(
    *,
    base_lr: float,
    schedule: str = "warmup_cosine",
    warmup_epochs: int = 0,
    cosine_epochs: int = 0,
    steps_per_epoch: int = 1,
    cosine_floor: float = 0.0,
    milestones: tuple[int, ...] = (),
    step_gamma: float = 0.1,
    exponential_gamma: float = 0.99,
    total_epochs: int = 0,
) -> optax.Schedule:
    """Learning rate as a function of the optimizer step, held constant within an epoch.

    The reference implementation's ``GradualWarmupScheduler`` around one of its schedulers
    (``optim_interface`` in ``fullbatch/training/optimizers.py``; all stepped once per epoch),
    with e = step // steps_per_epoch, W = ``warmup_epochs``, H = ``cosine_epochs`` (the decay
    horizon), the decay's own epoch t = e - W - 1 (t = e without warmup) and the floor
    f = ``cosine_floor * base_lr``:

        lr(e) = base_lr * e / W                                     for e <= W (warmup)

    and after the warmup, by ``schedule``:

        warmup_cosine       f + (base_lr - f) * (1 + cos(pi * min(t, H) / H)) / 2
        warmup_constant     base_lr
        warmup_linear       f + (base_lr - f) * (1 - min(t, H) / H)
        warmup_step         base_lr * step_gamma ** (number of milestones m <= t)
        warmup_exponential  base_lr * exponential_gamma ** t

    so the warmup starts at 0 (the first epoch does not move the weights, as in the reference)
    and the decay starts one epoch after the warmup ends. The reference's schedulers map to
    these as: ``cosine-decay`` = warmup_cosine with H = the run's epochs; ``cosine-4000`` = H =
    4000 (with W = 400 a 3000-step run ends at 27% of the base rate); ``cosine-decay-floored``
    = ``cosine_floor`` 1/25; ``linear`` (torch's ``MultiStepLR``, despite its name) =
    warmup_step with milestones at ``epochs // 2.667``, ``// 1.6`` and ``// 1.142`` (3/8, 5/8
    and 7/8 of the run) and gamma 0.1; ``exponential`` = warmup_exponential with gamma 0.99;
    none = warmup_constant. warmup_linear (a linear decay to the floor over H epochs) has no
    counterpart there. Unlike torch's ``CosineAnnealingLR``, which rises again after H
    epochs, the cosine and linear decays stay at the floor.

    The rates are computed in float64 on the host and rounded once to the device's float type,
    so in float32 every rate is within 2^-24 (6e-8) relative of the exact value (float32
    arithmetic from an int32 step count was off by up to 9e-7); in float64 (``jax_enable_x64``)
    they are exact to the last digits. warmup_exponential needs ``total_epochs``, the length of
    its table (the run's epochs). With ``total_epochs`` the table ends there (a run never asks
    for a later epoch's rate; past the table the rate stays at that of epoch ``total_epochs``),
    so a warmup or decay far longer than the run costs nothing.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if base_lr <= 0:
        raise ValueError(f"base_lr must be positive, got {base_lr}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be non-negative, got {warmup_epochs}")
    if schedule in ("warmup_cosine", "warmup_linear") and cosine_epochs <= 0:
        raise ValueError(f"cosine_epochs must be positive, got {cosine_epochs}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    if not 0 <= cosine_floor <= 1:
        raise ValueError(f"cosine_floor must be in [0, 1], got {cosine_floor}")
    if any(int(m) != m or m < 0 for m in milestones):
        raise ValueError(f"milestones must be non-negative integers, got {tuple(milestones)}")
    if not step_gamma > 0:
        raise ValueError(f"step_gamma must be positive, got {step_gamma}")
    if not exponential_gamma > 0:
        raise ValueError(f"exponential_gamma must be positive, got {exponential_gamma}")
    if schedule == "warmup_exponential" and total_epochs < 1:
        raise ValueError(f"total_epochs must be at least 1, got {total_epochs}")

    rates = _epoch_rates(
        base_lr,
        schedule,
        warmup_epochs,
        cosine_epochs,
        floor=cosine_floor * base_lr,
        milestones=tuple(int(m) for m in milestones),
        step_gamma=step_gamma,
        exponential_gamma=exponential_gamma,
        total_epochs=total_epochs,
    )

    def lr(step):
        # A table of float64 values computed on the host, rounded once to the device's float
        # type: within 2^-24 (6e-8) of the exact rate in float32, exact in float64 (x64).
        # Past the table the rate stays at its last value (the end of the decay, or base_lr).
        epoch = jnp.asarray(step) // steps_per_epoch
        return jnp.asarray(rates)[jnp.clip(epoch, 0, len(rates) - 1)]

    return lr


def reference_step_milestones(epochs: int) -> tuple[int, ...]:
    """The milestones of the reference's ``linear`` scheduler for a run of ``epochs``:
    ``epochs // 2.667``, ``// 1.6``, ``// 1.142`` (floor divisions by floats, as written there)."""
    return tuple(int(epochs // divisor) for divisor in (2.667, 1.6, 1.142))


def _epoch_rates(
    base_lr: float,
    schedule: str,
    warmup_epochs: int,
    cosine_epochs: int,
    *,
    floor: float = 0.0,
    milestones: tuple[int, ...] = (),
    step_gamma: float = 0.1,
    exponential_gamma: float = 0.99,
    total_epochs: int = 0,
) -> np.ndarray:
    """``lr(e)`` in float64 for ``e = 0`` up to the epoch after which it no longer changes (the
    formula of :func:`learning_rate_schedule`, evaluated as the reference's schedulers do in
    Python)."""
    decay_length = {
        "warmup_cosine": cosine_epochs,
        "warmup_linear": cosine_epochs,
        "warmup_constant": 0,
        "warmup_step": max(milestones, default=0),
        "warmup_exponential": max(total_epochs - warmup_epochs - 1, 0),
    }[schedule]
    last = warmup_epochs + 1 + decay_length
    if total_epochs > 0:  # the run never reaches a later epoch
        last = min(last, total_epochs)
    rates = np.empty(last + 1, np.float64)
    for epoch in range(last + 1):
        since = epoch - warmup_epochs - 1 if warmup_epochs else epoch
        if warmup_epochs and epoch <= warmup_epochs:
            rates[epoch] = base_lr * (epoch / warmup_epochs)
        elif schedule == "warmup_constant":
            rates[epoch] = base_lr
        elif schedule == "warmup_cosine" and not floor:
            progress = min(since, cosine_epochs) / cosine_epochs
            rates[epoch] = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif schedule == "warmup_cosine":
            progress = min(since, cosine_epochs) / cosine_epochs
            rates[epoch] = floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif schedule == "warmup_linear":
            progress = min(since, cosine_epochs) / cosine_epochs
            rates[epoch] = floor + (base_lr - floor) * (1.0 - progress)
        elif schedule == "warmup_step":
            drops = sum(1 for milestone in milestones if milestone <= since)
            rates[epoch] = base_lr * step_gamma**drops
        else:  # warmup_exponential
            rates[epoch] = base_lr * exponential_gamma**since
    return rates
