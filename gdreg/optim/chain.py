"""The optax chains of the optimizers, and the reference's gradient clipping.

Geiping et al. (ICLR 2022), Sec. 3 and the authors' configuration: gradient descent with
Nesterov momentum 0.9, weight decay 5e-4 added to the gradient (the PyTorch SGD convention),
clipping of the full mean gradient to global L2 norm 0.25 before weight decay and momentum,
and a linear warmup followed by a cosine decay whose horizon is counted from the end of the
warmup and may exceed the run ("cosine-4000" over a 3000-step run).

The other optimizers, modifications and schedules of the reference implementation
(``fullbatch/training/optimizers.py``, ``config/hyp/optim/*.yaml``,
``config/hyp/optim_modification/*.yaml``) are :func:`optimizer_chain`'s options and
the schedules of :mod:`gdreg.optim.schedules`; the transformations optax lacks are in
:mod:`gdreg.optim.transforms`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gdreg.optim import MODIFICATIONS, OPTIMIZERS
from gdreg.optim.transforms import (
    add_gradient_noise,
    add_norm_bias,
    multiply_gradient_noise,
    scale_by_layerwise_trust_ratio,
)

#: The reference's clipping divides by ``||g|| + CLIP_EPSILON``.
CLIP_EPSILON = 1e-6


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

    1. ``+ norm bias`` (:func:`gdreg.optim.transforms.add_norm_bias`, if ``norm_bias > 0``);
    2. clipping to ``clip_norm`` in the ``clip_norm_type`` norm (:func:`clip_by_global_norm`,
       if ``clip_norm > 0``);
    3. additive, then multiplicative gradient noise (if their standard deviations are > 0),
       drawn from ``(noise_seed, step)``;
    4. ``modification`` ``lars``/``larc``: the layer-wise trust ratio, which takes over the
       weight decay (:func:`gdreg.optim.transforms.scale_by_layerwise_trust_ratio`);
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
         (the output layer, see :func:`gdreg.optim.transforms.output_layer_mask`), then the
         ``sgd`` steps. The reference's ``SGD_AGC`` (its preset: lr 1.6, weight decay 2e-5,
         clipping 0.01, eps 1e-3).

    ``weight_decay_mask`` (a pytree of bools or a function of the parameters, e.g.
    :func:`gdreg.optim.transforms.kernel_mask`) limits the weight decay to some parameters.
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
