"""CIFAR ResNets (He et al. 2016) as configured in the reference implementation.

* Stem: 3x3 conv (stride 1, no bias) -> BN -> ReLU; no max-pool.
* Four stages with strides 1, 2, 2, 2 and base widths ``w, 2w, 4w, 8w`` (``w = 64`` by
  default). Basic blocks (ResNet-18/34) output ``planes`` channels, bottleneck blocks
  (ResNet-50/101/152, stride on the 3x3 conv, "v1.5") output ``4 * planes``.
* Shortcut "C" (He et al. 2019, "bag of tricks" ResNet-D) whenever the block changes the
  shape: a ``stride x stride`` average pool, then 1x1 conv (no bias) + BN. With stride 1 the
  pool is the identity (PyTorch ``AvgPool2d(1, 1)``), so a channel change without a stride,
  as in the first bottleneck stage (``w -> 4w``), is a plain 1x1 conv + BN.
* Convolutions: no bias, Kaiming-normal fan_out init. BN scale 1, bias 0 everywhere (the
  zero init of the last BN of each branch is off, as in the reference runs).
* Head: global average pool -> linear with PyTorch's default ``nn.Linear`` init.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdreg.models import layers
from gdreg.types import Dtype


class ShortcutC(nn.Module):
    """Projection shortcut: avg-pool(stride) -> 1x1 conv -> BN."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = layers.avg_pool_ceil(x, self.strides)
        x = layers.conv(self.features, 1, dtype=self.dtype, name="conv")(x)
        return layers.batch_norm(train, dtype=self.dtype, name="bn")(x)


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus shortcut, then ReLU."""

    planes: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.planes * self.expansion
        y = layers.conv(self.planes, 3, strides=self.strides, dtype=self.dtype, name="conv1")(x)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn1")(y)
        y = nn.relu(y)
        y = layers.conv(out_features, 3, dtype=self.dtype, name="conv2")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = ShortcutC(out_features, self.strides, self.dtype, name="shortcut")(x, train)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 conv -> BN -> ReLU -> 3x3 conv (strided) -> BN -> ReLU -> 1x1 conv (4x) -> BN,
    plus shortcut, then ReLU."""

    planes: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.planes * self.expansion
        y = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn1")(y)
        y = nn.relu(y)
        y = layers.conv(self.planes, 3, strides=self.strides, dtype=self.dtype, name="conv2")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn2")(y)
        y = nn.relu(y)
        y = layers.conv(out_features, 1, dtype=self.dtype, name="conv3")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn3")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = ShortcutC(out_features, self.strides, self.dtype, name="shortcut")(x, train)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet. ``width`` is the stem / first-stage width (64 in the paper)."""

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    width: int = 64
    strides: Sequence[int] = (1, 2, 2, 2)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        x = layers.conv(self.width, 3, dtype=self.dtype, name="stem_conv")(x)
        x = layers.batch_norm(train, dtype=self.dtype, name="stem_bn")(x)
        x = nn.relu(x)
        for i, (num_blocks, stride) in enumerate(zip(self.stage_sizes, self.strides, strict=True)):
            planes = self.width * 2**i
            for j in range(num_blocks):
                x = self.block_cls(
                    planes,
                    strides=stride if j == 0 else 1,
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x, train)
        x = layers.global_avg_pool(x)
        x = layers.torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64


RESNET_CONFIGS: dict[int, tuple[type[nn.Module], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def resnet(
    depth: int, *, num_classes: int, width: int | None = None, dtype: Dtype = jnp.float32
) -> ResNet:
    """Factory for the registry: ResNet-``depth`` with base width ``width`` (default 64)."""
    block_cls, stage_sizes = RESNET_CONFIGS[depth]
    return ResNet(
        stage_sizes=stage_sizes,
        block_cls=block_cls,
        num_classes=num_classes,
        width=64 if width is None else width,
        dtype=dtype,
    )
