"""Learning-rate schedules and the optax chains of the optimizers.

Geiping et al. (ICLR 2022), Sec. 3 and the authors' configuration: gradient descent with
Nesterov momentum 0.9, weight decay 5e-4 added to the gradient (the PyTorch SGD convention),
clipping of the full mean gradient to global L2 norm 0.25 before weight decay and momentum,
and a linear warmup followed by a cosine decay whose horizon is counted from the end of the
warmup and may exceed the run ("cosine-4000" over a 3000-step run).

The other optimizers, modifications and schedules of the reference implementation
(``fullbatch/training/optimizers.py``, ``config/hyp/optim/*.yaml``,
``config/hyp/optim_modification/*.yaml``) are :func:`optimizer_chain`'s options and
:data:`SCHEDULES`; the transformations optax lacks are in :mod:`gdreg.gradient_transforms`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdreg.gradient_transforms import (
    add_gradient_noise,
    add_norm_bias,
    multiply_gradient_noise,
    scale_by_layerwise_trust_ratio,
)

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
#: no optax chain: the training loop makes its extra gradient evaluation
#: (:func:`gdreg.modifications.sam_gradient`).
MODIFICATIONS = ("none", "lars", "larc", "sam")
#: ``optim.clip_norm_type``: the reference's ``grad_clip_norm``, 2 or infinity.
CLIP_NORM_TYPES = {"2": 2.0, "inf": math.inf}

#: The reference's clipping divides by ``||g|| + CLIP_EPSILON``.
CLIP_EPSILON = 1e-6


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
    its table (the run's epochs).
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


def clip_by_global_norm(max_norm: float, *, norm_type: float = 2.0) -> optax.GradientTransformation:
    """Scales the update by ``max_norm / (||g|| + 1e-6)`` when ``||g|| > max_norm``.

    The reference implementation's full-gradient clipping (``_modify_gradient_params`` in
    ``fullbatch/training/training.py``: scale only ``if grad_norm > grad_clip``; torch's
    ``clip_grad_norm_`` also scales norms just below the maximum), and its per-block clipping
    (``batch_clip``, ``_clip_gradient_list`` in ``fullbatch/training/utils.py``), with ``||g||``
    the global norm over all leaves: L2 (``norm_type=2``, the default) or the largest absolute
    entry (``norm_type=inf``; the reference's ``grad_clip_norm``). Norms at or below
    ``max_norm`` pass unchanged. optax's ``clip_by_global_norm`` divides by ``||g||`` itself,
    which differs by up to 4e-6 relative per clipped step.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2 or inf, got {norm_type}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        if norm_type == 2.0:
            norm = optax.tree.norm(updates)
        else:
            norm = optax.tree.max(jax.tree.map(jnp.abs, updates))
        scale = jnp.where(norm > max_norm, max_norm / (norm + CLIP_EPSILON), 1.0)
        return jax.tree.map(lambda g: (g * scale.astype(g.dtype)).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer_chain(
    learning_rate: optax.ScalarOrSchedule,
    *,
    name: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    weight_decay_mask: Any = None,
    clip_norm: float = 0.0,
    clip_norm_type: float = 2.0,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    agc_clipping: float = 0.01,
    agc_eps: float = 1e-3,
    agc_mask: Any = None,
    modification: str = "none",
    trust_coefficient: float = 0.02,
    trust_eps: float = 1e-8,
    norm_bias: float = 0.0,
    norm_bias_norm: int = 1,
    norm_bias_target: float = 0.0,
    noise_additive: float = 0.0,
    noise_multiplicative: float = 0.0,
    noise_seed: int = 0,
) -> optax.GradientTransformation:
    """The optax chain applied to the full mean gradient, in the reference implementation's
    order (``_modify_gradient_params``, then the optimizer's ``step``):

    1. ``+ norm bias`` (:func:`gdreg.gradient_transforms.add_norm_bias`, if ``norm_bias > 0``);
    2. clipping to ``clip_norm`` in the ``clip_norm_type`` norm (:func:`clip_by_global_norm`,
       if ``clip_norm > 0``);
    3. additive, then multiplicative gradient noise (if their standard deviations are > 0),
       drawn from ``(noise_seed, step)``;
    4. ``modification`` ``lars``/``larc``: the layer-wise trust ratio, which takes over the
       weight decay (:func:`gdreg.gradient_transforms.scale_by_layerwise_trust_ratio`);
    5. the optimizer ``name``:

       * ``sgd``: ``+ weight_decay * p`` (coupled, torch's SGD) and ``optax.sgd`` with
         ``momentum`` (Nesterov if ``nesterov``): buf = m * buf + d; p -= lr * (d + m * buf)
         (Nesterov) or lr * buf. The paper's optimizer.
       * ``adam``: ``+ weight_decay * p`` (coupled, torch's ``Adam``) and ``optax.adam``.
       * ``adamw``: ``optax.adamw``, decoupled weight decay: p -= lr * (adam + weight_decay *
         p), which is torch's ``AdamW``, the reference's ``Adam`` (its preset: lr 1e-3, betas
         (0.9, 0.999), eps 1e-8, weight decay 0.01).
       * ``gd_agc``: unit-wise adaptive gradient clipping (Brock et al. 2021,
         ``optax.adaptive_grad_clip(agc_clipping, agc_eps)``: each output unit's gradient to at
         most ``agc_clipping * max(||p_unit||, agc_eps)``), except where ``agc_mask`` is False
         (the output layer, see :func:`gdreg.gradient_transforms.output_layer_mask`), then the
         ``sgd`` steps. The reference's ``SGD_AGC`` (its preset: lr 1.6, weight decay 2e-5,
         clipping 0.01, eps 1e-3).

    ``weight_decay_mask`` (a pytree of bools or a function of the parameters, e.g.
    :func:`gdreg.gradient_transforms.kernel_mask`) limits the weight decay to some parameters.
    With every option at its default this is the chain of :func:`sgd_chain`, state included.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {OPTIMIZERS}, got {name!r}")
    if modification not in MODIFICATIONS:
        raise ValueError(f"modification must be one of {MODIFICATIONS}, got {modification!r}")
    if clip_norm < 0:
        raise ValueError(f"clip_norm must be non-negative, got {clip_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    parts = []
    if norm_bias > 0:
        parts.append(add_norm_bias(norm_bias, norm=norm_bias_norm, target=norm_bias_target))
    if clip_norm > 0:
        parts.append(clip_by_global_norm(clip_norm, norm_type=clip_norm_type))
    if noise_additive > 0:
        parts.append(add_gradient_noise(noise_additive, seed=noise_seed))
    if noise_multiplicative > 0:
        parts.append(multiply_gradient_noise(noise_multiplicative, seed=noise_seed))
    if modification in ("lars", "larc"):
        parts.append(
            scale_by_layerwise_trust_ratio(
                trust_coefficient=trust_coefficient,
                eps=trust_eps,
                weight_decay=weight_decay,
                weight_decay_mask=weight_decay_mask,
                clip=modification == "larc",
                learning_rate=learning_rate,
            )
        )
        weight_decay = 0.0  # the wrapper absorbed it, as the reference's LARS does
    if name == "gd_agc":
        clip = optax.adaptive_grad_clip(agc_clipping, eps=agc_eps)
        parts.append(clip if agc_mask is None else optax.masked(clip, agc_mask))
    if name == "adamw":
        parts.append(
            optax.adamw(
                learning_rate,
                b1=adam_b1,
                b2=adam_b2,
                eps=adam_eps,
                weight_decay=weight_decay,
                mask=weight_decay_mask,
            )
        )
        return optax.chain(*parts)
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    if name == "adam":
        parts.append(optax.adam(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps))
    else:  # sgd, gd_agc
        parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)


def sgd_chain(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    clip_norm: float = 0.0,
) -> optax.GradientTransformation:
    """clip (global L2 norm, if clip_norm > 0) -> + weight_decay * params -> momentum SGD.

    Matches ``torch.optim.SGD(momentum, nesterov, weight_decay)`` after the reference's
    clipping (:func:`clip_by_global_norm`): buf = m * buf + g; d = g + m * buf (Nesterov) or
    buf; params -= lr_t * d. The paper's optimizer: :func:`optimizer_chain` with its defaults.
    """
    return optimizer_chain(
        learning_rate,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        clip_norm=clip_norm,
    )
