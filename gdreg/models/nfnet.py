"""Normalizer-free network NFNet-F0 (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization") with the CIFAR stem, as configured in the reference
(config/model/nfn.yaml: variant F0, stem CIFAR, alpha 0.2, SE ratio 0.5, GELU, no stochastic
depth, no dropout; fullbatch/models/nfnets.py, itself from benjs/nfnets_pytorch).

No BatchNorm: the model has only ``params`` (its ``model_state`` is ``{}``), and train and eval
mode compute the same function.

* Every convolution is weight-standardized (Qiao et al. 2019; :class:`WSConv`): with ``W`` the
  kernel of one output channel (``F = fan_in`` entries) the convolution uses
  ``gain * (W - mean(W)) / sqrt(max(F * var(W), 1e-4))`` (``var`` unbiased, as ``torch.var``)
  and adds a bias; parameters ``kernel``, ``gain`` (per output channel, 1 at init) and
  ``bias``.
* Activation: ``gelu(x) * 1.7015043497085571`` (exact GELU, scaled to keep the variance).
* Stem (CIFAR: every stride 1): four *unpadded* 3x3 convs to ``w/16, w/8, w/4, w/2``
  channels (16, 32, 64, 128 at the default ``w = 256``), the activation between them, so a
  32x32 input leaves the stem at 24x24 and inputs need at least 9x9 pixels.
* Four stages of 1, 2, 6, 3 blocks, widths ``w, 2w, 6w, 6w``, strides 1, 2, 2, 2. Block
  (``beta``, ``alpha = 0.2``; ``beta = 1 / expected_std`` as the reference tracks it:
  ``expected_std`` grows as ``sqrt(s^2 + alpha^2)`` per block and restarts from 1 after the
  first block of each stage):

      h = act(x) * beta
      shortcut = x                                  (same shape), or
                 WSConv1x1(avg_pool_2x2(h))         (strided), or WSConv1x1(h) (wider)
      y = WSConv1x1(h) -> act -> WSConv3x3(stride, grouped) -> act -> WSConv3x3(grouped)
          -> act -> WSConv1x1 (to the block width)
      y = 2 * SE(y) * y,   SE(y) = sigmoid(Dense(act(Dense(mean_HW(y)))))  (hidden: width / 2)
      out = y * alpha * skip_gain + shortcut         (skip_gain: a scalar parameter, 0 at init)

  The bottleneck has ``width / 2`` channels in groups of ``w / 2`` (one group in the first
  stage, 2 in the second, 6 in the last two), as the reference's group size 128.
* Head: WSConv1x1 to ``2 * 6w`` channels -> act -> global average pool -> linear.
* Init as the reference's: conv kernels Xavier-normal (PyTorch's fans: ``in/groups * k * k``
  and ``out * k * k``), conv biases PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  gains 1, skip gains 0; SE layers PyTorch's default ``nn.Linear`` init; the classifier's
  weight N(0, 0.01), its bias PyTorch's default.

The strided shortcut pools 2x2 windows with stride 2; the reference's ``AvgPool2d`` drops a
partial last window, so on an odd-sized map its shortcut and its strided conv disagree in size
and its forward pass fails. Here the partial window is kept (the same size as the strided
conv's output). For 32x32 inputs (24, 12, 6 at the strided stages) the two are the same.

``width`` (default 256, a multiple of 16) is the first stage's width; all channel counts
scale with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from gdreg.models import layers

# PyTorch's F.gelu (exact) scaled so that it keeps a unit Gaussian's second moment, as the
# reference's VPGELU.
GELU_GAIN = 1.7015043497085571
DEFAULT_WIDTH = 256
# F0: blocks per stage; stage widths as multiples of the first stage's width (256, 512, 1536,
# 1536 in the reference).
F0_DEPTHS = (1, 2, 6, 3)
F0_WIDTH_MULTIPLIERS = (1, 2, 6, 6)
STRIDES = (1, 2, 2, 2)
# Torch's xavier_normal_: N(0, 2 / (fan_in + fan_out)), not truncated.
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def activation(x: jax.Array) -> jax.Array:
    """The reference's VPGELU: ``gelu(x) * 1.7015...`` with the exact (erf) GELU."""
    return jax.nn.gelu(x, approximate=False) * jnp.asarray(GELU_GAIN, x.dtype)


def standardize_kernel(kernel: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Weight standardization of an HWIO kernel per output channel (the reference's
    ``WSConv2D.standardized_weights``): ``gain * (W - mean) / sqrt(max(fan_in * var, eps))``,
    mean and unbiased variance over the ``fan_in = H * W * I`` entries of each output channel."""
    axes = tuple(range(kernel.ndim - 1))
    fan_in = math.prod(kernel.shape[:-1])
    mean = jnp.mean(kernel, axis=axes, keepdims=True)
    var = jnp.var(kernel, axis=axes, keepdims=True, ddof=1)
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
    return (kernel - mean) * scale * gain


class WSConv(nn.Module):
    """Weight-standardized convolution with bias (see :func:`standardize_kernel`)."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    groups: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{in_features} -> {self.features} channels do not split into {self.groups} groups"
            )
        k = self.kernel_size
        shape = (k, k, in_features // self.groups, self.features)
        kernel = self.param("kernel", xavier_normal, shape, layers.PARAM_DTYPE)
        gain = self.param("gain", nn.initializers.ones, (self.features,), layers.PARAM_DTYPE)
        fan_in = math.prod(shape[:-1])
        bias = self.param(
            "bias", layers.torch_default_bias_init(fan_in), (self.features,), layers.PARAM_DTYPE
        )
        weight = standardize_kernel(kernel, gain).astype(self.dtype)
        pad = self.padding
        y = layers.conv_general_dilated(
            jnp.asarray(x, self.dtype),
            weight,
            (self.strides, self.strides),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        return y + bias.astype(self.dtype)


class SqueezeExcite(nn.Module):
    """``sigmoid(Dense(act(Dense(mean_HW(x)))))`` per image and channel (hidden: ``ratio * C``)."""

    ratio: float = 0.5
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        hidden = max(1, int(channels * self.ratio))
        y = layers.global_avg_pool(x)
        y = layers.torch_dense(hidden, channels, dtype=self.dtype, name="linear")(y)
        y = layers.torch_dense(channels, hidden, dtype=self.dtype, name="linear_1")(activation(y))
        return jax.nn.sigmoid(y)[:, None, None, :]


class NFBlock(nn.Module):
    """One NF-ResNet bottleneck block (see the module docstring)."""

    features: int
    group_size: int
    strides: int = 1
    beta: float = 1.0
    alpha: float = 0.2
    se_ratio: float = 0.5
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups = int(self.features * 0.5) // self.group_size
        width = self.group_size * groups
        h = activation(x) * jnp.asarray(self.beta, x.dtype)
        if self.strides > 1:
            pooled = layers.avg_pool_ceil(h, self.strides)
            shortcut = WSConv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(pooled)
        elif x.shape[-1] != self.features:
            shortcut = WSConv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(h)
        else:
            shortcut = x
        y = activation(WSConv(width, 1, dtype=self.dtype, name="conv0")(h))
        y = WSConv(width, 3, self.strides, 1, groups, dtype=self.dtype, name="conv1")(y)
        y = WSConv(width, 3, 1, 1, groups, dtype=self.dtype, name="conv1b")(activation(y))
        y = WSConv(self.features, 1, dtype=self.dtype, name="conv2")(activation(y))
        y = 2 * SqueezeExcite(self.se_ratio, self.dtype, name="squeeze_excite")(y) * y
        skip_gain = self.param("skip_gain", nn.initializers.zeros, (), layers.PARAM_DTYPE)
        return y * (self.alpha * skip_gain).astype(self.dtype) + shortcut


def block_betas(depths: Sequence[int], alpha: float) -> list[float]:
    """``beta = 1 / expected_std`` of every block, in order, as the reference's ``NFNet``
    tracks it: ``expected_std`` starts at 1, is reset to 1 after the first block of each stage
    and then grows as ``sqrt(expected_std^2 + alpha^2)`` after every block."""
    betas = []
    expected_std = 1.0
    for stage_depth in depths:
        for block_index in range(stage_depth):
            betas.append(1.0 / expected_std)
            if block_index == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
    return betas


class NFNet(nn.Module):
    """NFNet-F0 with the CIFAR stem; ``width`` is the first stage's width (256 in F0)."""

    num_classes: int
    width: int = DEFAULT_WIDTH
    alpha: float = 0.2
    se_ratio: float = 0.5
    stage_depths: Sequence[int] = F0_DEPTHS  # blocks per stage (tests use fewer)
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no BatchNorm, and the reference's dropout and stochastic depth are off
        if self.width < 16 or self.width % 16:
            raise ValueError(f"NFNet width must be a positive multiple of 16, got {self.width}")
        w = self.width
        x = jnp.asarray(x, self.dtype)
        stem = (w // 16, w // 8, w // 4, w // 2)
        for i, features in enumerate(stem):
            x = WSConv(features, 3, dtype=self.dtype, name=f"stem_conv{i}")(x)
            if i < len(stem) - 1:
                x = activation(x)
        betas = iter(block_betas(self.stage_depths, self.alpha))
        stages = zip(self.stage_depths, F0_WIDTH_MULTIPLIERS, STRIDES, strict=True)
        for i, (stage_depth, multiplier, stride) in enumerate(stages):
            for j in range(stage_depth):
                x = NFBlock(
                    multiplier * w,
                    group_size=w // 2,
                    strides=stride if j == 0 else 1,
                    beta=next(betas),
                    alpha=self.alpha,
                    se_ratio=self.se_ratio,
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        x = WSConv(2 * x.shape[-1], 1, dtype=self.dtype, name="final_conv")(x)
        x = layers.global_avg_pool(activation(x))
        x = layers.dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(stddev=0.01),
            bias_init=layers.torch_default_bias_init(x.shape[-1]),
            name="linear",
        )(x)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def nfnet(*, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32) -> NFNet:
    """Factory for the registry: the reference's ``nfn.yaml`` (NFNet-F0, CIFAR stem);
    ``width`` is the first stage's width (default 256, a multiple of 16)."""
    width = DEFAULT_WIDTH if width is None else width
    if width % 16:
        raise ValueError(f"width must be a multiple of 16 for nfnet, got {width}")
    return NFNet(num_classes=num_classes, width=width, dtype=dtype)
