"""Small models without BatchNorm: the two CNNs of the third-party small-scale reproduction
(ReLU) and the reference's debugging linear model.

The reproduction only describes them as "1 conv + 1 linear" and "2 conv (with pooling) +
2 linear"; the sizes below are this project's choice:

* ``convnet1`` (ConvNet1): 3x3 conv (``width`` = 32 channels by default, padding 1, bias)
  -> ReLU -> flatten -> linear to ``num_classes``. No pooling.
* ``convnet2`` (ConvNet2): 3x3 conv (``width``) -> ReLU -> 2x2 max-pool -> 3x3 conv
  (``2 * width``) -> ReLU -> 2x2 max-pool -> flatten -> linear (``4 * width`` hidden units)
  -> ReLU -> linear to ``num_classes``.

All layers use PyTorch's default initialization (weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in))). The flattened feature size, and so the size of the
first linear layer, depends on the input's spatial size (Flax infers it at init).

* ``linear`` (:class:`Linear`): the reference's ``config/model/linear.yaml`` ("only use this
  for debugging"; fullbatch/models/models.py, ``construct_model``): the image flattened in
  PyTorch's channels-first order (C, H, W), its first ``width`` = 100 entries kept (for
  CIFAR, the first three rows and four pixels of the red channel), then one linear layer
  ``width -> num_classes`` (PyTorch's default init): 1,010 parameters for 10 classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from gdreg.models import layers


def _torch_conv(features: int, fan_in: int, dtype: DTypeLike, name: str) -> nn.Conv:
    return layers.conv(
        features,
        3,
        dtype=dtype,
        use_bias=True,
        kernel_init=layers.torch_default_kernel_init,
        bias_init=layers.torch_default_bias_init(fan_in),
        name=name,
    )


class ConvNet1(nn.Module):
    num_classes: int
    width: int = 32
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no BatchNorm / dropout
        x = jnp.asarray(x, self.dtype)
        x = _torch_conv(self.width, 9 * x.shape[-1], self.dtype, "conv1")(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = layers.torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name="fc1")(x)
        return x.astype(jnp.float32)


class ConvNet2(nn.Module):
    num_classes: int
    width: int = 32
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no BatchNorm / dropout
        x = jnp.asarray(x, self.dtype)
        x = _torch_conv(self.width, 9 * x.shape[-1], self.dtype, "conv1")(x)
        x = nn.relu(x)
        x = layers.max_pool_ceil(x, 2)
        x = _torch_conv(2 * self.width, 9 * x.shape[-1], self.dtype, "conv2")(x)
        x = nn.relu(x)
        x = layers.max_pool_ceil(x, 2)
        x = x.reshape((x.shape[0], -1))
        x = layers.torch_dense(4 * self.width, x.shape[-1], dtype=self.dtype, name="fc1")(x)
        x = nn.relu(x)
        x = layers.torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name="fc2")(x)
        return x.astype(jnp.float32)


class Linear(nn.Module):
    """Linear classifier on the first ``width`` entries of the channels-first flattened image."""

    num_classes: int
    width: int = 100
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        x = jnp.asarray(x, self.dtype)
        # PyTorch flattens NCHW; the reference keeps the first entries of that order.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))
        if x.shape[-1] < self.width:
            raise ValueError(
                f"the linear model keeps {self.width} input entries, the images have {x.shape[-1]}"
            )
        x = x[:, : self.width]
        x = layers.torch_dense(self.num_classes, self.width, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


def convnet1(
    *, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32
) -> ConvNet1:
    return ConvNet1(num_classes=num_classes, width=32 if width is None else width, dtype=dtype)


def convnet2(
    *, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32
) -> ConvNet2:
    return ConvNet2(num_classes=num_classes, width=32 if width is None else width, dtype=dtype)


def linear(*, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32) -> Linear:
    """The reference's debugging linear model; ``width`` is the number of input entries it
    keeps (default 100)."""
    return Linear(num_classes=num_classes, width=100 if width is None else width, dtype=dtype)
