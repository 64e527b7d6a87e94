"""The two small CNNs of the third-party small-scale reproduction (no BatchNorm, ReLU).

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
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdreg.models import layers
from gdreg.types import Dtype


def _torch_conv(features: int, fan_in: int, dtype: Dtype, name: str) -> nn.Conv:
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
    dtype: Dtype = jnp.float32

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
    dtype: Dtype = jnp.float32

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


def convnet1(*, num_classes: int, width: int | None = None, dtype: Dtype = jnp.float32) -> ConvNet1:
    return ConvNet1(num_classes=num_classes, width=32 if width is None else width, dtype=dtype)


def convnet2(*, num_classes: int, width: int | None = None, dtype: Dtype = jnp.float32) -> ConvNet2:
    return ConvNet2(num_classes=num_classes, width=32 if width is None else width, dtype=dtype)
