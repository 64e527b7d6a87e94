"""Learning-rate schedules and the optax chain of the paper's optimizer.

Geiping et al. (ICLR 2022), Sec. 3 and the authors' configuration: gradient descent with
Nesterov momentum 0.9, weight decay 5e-4 added to the gradient (the PyTorch SGD convention),
clipping of the full mean gradient to global L2 norm 0.25 before weight decay and momentum,
and a linear warmup followed by a cosine decay whose horizon is counted from the end of the
warmup and may exceed the run ("cosine-4000" over a 3000-step run).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_cosine", "warmup_constant")


def learning_rate_schedule(
    *,
    base_lr: float,
    schedule: str = "warmup_cosine",
    warmup_epochs: int = 0,
    cosine_epochs: int = 0,
    steps_per_epoch: int = 1,
) -> optax.Schedule:
    """Learning rate as a function of the optimizer step, held constant within an epoch.

    The reference implementation's ``GradualWarmupScheduler`` around ``CosineAnnealingLR``
    (stepped once per epoch), with e = step // steps_per_epoch, W = ``warmup_epochs`` and
    H = ``cosine_epochs``:

        lr(e) = base_lr * e / W                                          for e <= W
        lr(e) = base_lr * (1 + cos(pi * min(e - W - 1, H) / H)) / 2      for e > W ("warmup_cosine")
        lr(e) = base_lr                                                  for e > W ("warmup_constant")

    so the warmup starts at 0 (the first epoch does not move the weights, as in the reference)
    and the cosine starts one epoch after the warmup ends. Without warmup (W = 0) the cosine
    starts at once: lr(e) = base_lr * (1 + cos(pi * min(e, H) / H)) / 2. With W = 400 and
    H = 4000 ("cosine-4000") a 3000-step run ends at 27% of the base rate.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if base_lr <= 0:
        raise ValueError(f"base_lr must be positive, got {base_lr}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be non-negative, got {warmup_epochs}")
    if schedule == "warmup_cosine" and cosine_epochs <= 0:
        raise ValueError(f"cosine_epochs must be positive, got {cosine_epochs}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")

    def lr(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        if warmup_epochs == 0:
            since_warmup, warm = epoch, jnp.float32(base_lr)
        else:
            since_warmup = epoch - warmup_epochs - 1
            warm = base_lr * epoch / warmup_epochs
        if schedule == "warmup_constant":
            after = jnp.asarray(base_lr, jnp.float32)
        else:
            progress = jnp.clip(since_warmup, 0, cosine_epochs) / cosine_epochs
            after = base_lr * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(epoch <= warmup_epochs, warm, after).astype(jnp.float32)

    return lr


def sgd_chain(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    clip_norm: float = 0.0,
) -> optax.GradientTransformation:
    """clip (global L2 norm, if clip_norm > 0) -> + weight_decay * params -> momentum SGD.

    Matches ``torch.optim.SGD(momentum, nesterov, weight_decay)`` after
    ``clip_grad_norm_(clip_norm)``: buf = m * buf + g; d = g + m * buf (Nesterov) or buf;
    params -= lr_t * d.
    """
    if clip_norm < 0:
        raise ValueError(f"clip_norm must be non-negative, got {clip_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)
