"""DenseNet-BC (Huang et al. 2017) with the CIFAR stem, as configured in the reference
(config/model/densenet{121,161,169,201}.yaml, fullbatch/models/densenets.py).

* Stem: one 3x3 conv (stride 1, no bias) to ``2 * growth`` features; no BN/ReLU/pooling
  right after it (the first dense layer starts with BN -> ReLU).
* Dense layer: BN -> ReLU -> 1x1 conv (``bn_size * growth``) -> BN -> ReLU -> 3x3 conv
  (``growth``), output concatenated to its input along channels.
* Transition (between blocks): BN -> ReLU -> 1x1 conv to ``floor(0.5 * C)`` -> 2x2 average
  pool, stride 2 (floor, as PyTorch).
* After the last block: BN -> ReLU -> global average pool -> linear.
* Init as torchvision's DenseNet: convs Kaiming-normal fan_in (PyTorch's
  ``kaiming_normal_`` defaults), BN 1/0, linear weight PyTorch default, linear bias 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from gdreg.models import layers


class DenseLayer(nn.Module):
    growth: int
    bn_size: int = 4
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = layers.batch_norm(train, dtype=self.dtype, name="bn1")(x)
        y = nn.relu(y)
        y = layers.conv(
            self.bn_size * self.growth,
            1,
            dtype=self.dtype,
            kernel_init=layers.kaiming_normal_fan_in,
            name="conv1",
        )(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn2")(y)
        y = nn.relu(y)
        y = layers.conv(
            self.growth, 3, dtype=self.dtype, kernel_init=layers.kaiming_normal_fan_in, name="conv2"
        )(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    features: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = layers.batch_norm(train, dtype=self.dtype, name="bn")(x)
        x = nn.relu(x)
        x = layers.conv(
            self.features,
            1,
            dtype=self.dtype,
            kernel_init=layers.kaiming_normal_fan_in,
            name="conv",
        )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class DenseNet(nn.Module):
    """DenseNet-BC. ``growth`` is the growth rate; the stem has ``init_features`` channels
    (``2 * growth`` when None)."""

    block_config: Sequence[int]
    num_classes: int
    growth: int = 32
    init_features: int | None = None
    bn_size: int = 4
    compression: float = 0.5
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        init_features = 2 * self.growth if self.init_features is None else self.init_features
        x = jnp.asarray(x, self.dtype)
        x = layers.conv(
            init_features,
            3,
            dtype=self.dtype,
            kernel_init=layers.kaiming_normal_fan_in,
            name="stem_conv",
        )(x)
        for i, num_layers in enumerate(self.block_config):
            for j in range(num_layers):
                x = DenseLayer(
                    self.growth, self.bn_size, self.dtype, name=f"block{i + 1}_layer{j + 1}"
                )(x, train)
            if i != len(self.block_config) - 1:
                features = int(x.shape[-1] * self.compression)
                x = Transition(features, self.dtype, name=f"transition{i + 1}")(x, train)
        x = layers.batch_norm(train, dtype=self.dtype, name="final_bn")(x)
        x = nn.relu(x)
        x = layers.global_avg_pool(x)
        x = layers.dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


# depth -> (growth rate, layers per dense block), as the reference's
# ``densenet_depths_to_config``; its stem widths (64, 96, 64, 64) are twice the growth rate.
DENSENET_CONFIGS: dict[int, tuple[int, tuple[int, ...]]] = {
    121: (32, (6, 12, 24, 16)),
    161: (48, (6, 12, 36, 24)),
    169: (32, (6, 12, 32, 32)),
    201: (32, (6, 12, 48, 32)),
}


def densenet(
    depth: int, *, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32
) -> DenseNet:
    """Factory for the registry: ``width`` is the growth rate (default 32; 48 for
    DenseNet-161); the stem has ``2 * width`` features (64 by default, 96 for DenseNet-161)."""
    growth, block_config = DENSENET_CONFIGS[depth]
    return DenseNet(
        block_config=block_config,
        num_classes=num_classes,
        growth=growth if width is None else width,
        dtype=dtype,
    )
