"""ResNets (He et al. 2016) as configured in the reference implementation.

Two families, both built by :class:`ResNet`:

* ImageNet-style depths on CIFAR (``resnet18/34/50/101/152``): four stages with strides
  1, 2, 2, 2 and base widths ``w, 2w, 4w, 8w`` (``w = 64`` by default). Basic blocks
  (ResNet-18/34) output ``planes`` channels, bottleneck blocks (ResNet-50/101/152, stride on
  the 3x3 conv, "v1.5") output ``4 * planes``.
* The CIFAR ResNets of He et al. 2016, Sec. 4.2 (``resnet20/32/56/110``, ``6n + 2`` layers):
  three stages of ``n = 3, 5, 9, 18`` basic blocks with strides 1, 2, 2 and widths
  ``w, 2w, 4w``. The paper's widths are 16, 32, 64, and so are the reference's yamls
  (``width: 16``), but the reference's ``ResNet`` ignores that field: it chooses its first
  width with ``isinstance(block, BasicBlock)`` applied to the block *class*, which is always
  False, so it always builds 64, 128, 256 (4,327,754 parameters for its ResNet-20 instead of
  the paper's 0.27M). The default here is what the reference builds, ``w = 64``;
  ``width=16`` gives the paper's widths (272,474 parameters for ResNet-20: He et al.'s 0.27M
  plus the 1x1 projection shortcuts below, where the paper's option A pads with zeros).

Shared by both:

* Stem: 3x3 conv (stride 1, no bias) -> BN -> ReLU; no max-pool.
* Shortcut whenever a block changes the shape (the reference's ``downsample`` option):
  "C" (He et al. 2019, "bag of tricks" ResNet-D; every yaml but ``resnet20.yaml``): a
  ``stride x stride`` average pool, then 1x1 conv (no bias) + BN. With stride 1 the pool is
  the identity (PyTorch ``AvgPool2d(1, 1)``), so a channel change without a stride, as in
  the first bottleneck stage (``w -> 4w``), is a plain 1x1 conv + BN. "B" (He et al. 2016's
  option B; ``resnet20.yaml``): a 1x1 conv with the block's stride, then BN. Both have the
  parameters of a 1x1 conv + BN.
* Convolutions: no bias, Kaiming-normal fan_out init. BN scale 1, bias 0 everywhere (the
  zero init of the last BN of each branch is off, as in the reference runs: their yamls say
  ``skip-residual`` and their code tests for ``skip_residual``).
* Head: global average pool -> linear with PyTorch's default ``nn.Linear`` init.

Reference: fullbatch/models/resnets.py (``ResNet``, ``BasicBlock``, ``Bottleneck``,
``resnet_depths_to_config``) and config/model/resnet*.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from gdreg.models import layers


class ShortcutC(nn.Module):
    """Projection shortcut: avg-pool(stride) -> 1x1 conv -> BN."""

    features: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = layers.avg_pool_ceil(x, self.strides)
        x = layers.conv(self.features, 1, dtype=self.dtype, name="conv")(x)
        return layers.batch_norm(train, dtype=self.dtype, name="bn")(x)


class ShortcutB(nn.Module):
    """Projection shortcut: 1x1 conv with stride ``strides`` -> BN."""

    features: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = layers.conv(self.features, 1, strides=self.strides, dtype=self.dtype, name="conv")(x)
        return layers.batch_norm(train, dtype=self.dtype, name="bn")(x)


SHORTCUTS: dict[str, type[nn.Module]] = {"B": ShortcutB, "C": ShortcutC}


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus shortcut, then ReLU."""

    planes: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32
    shortcut: str = "C"  # a key of SHORTCUTS

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
            projection = SHORTCUTS[self.shortcut]
            shortcut = projection(out_features, self.strides, self.dtype, name="shortcut")(x, train)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 conv -> BN -> ReLU -> 3x3 conv (strided) -> BN -> ReLU -> 1x1 conv (4x) -> BN,
    plus shortcut, then ReLU."""

    planes: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32
    shortcut: str = "C"  # a key of SHORTCUTS

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
            projection = SHORTCUTS[self.shortcut]
            shortcut = projection(out_features, self.strides, self.dtype, name="shortcut")(x, train)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet. ``width`` is the stem / first-stage width; stage ``i`` (from 0) has
    ``width * 2**i`` planes; one stage per entry of ``stage_sizes`` and ``strides``."""

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    width: int = 64
    strides: Sequence[int] = (1, 2, 2, 2)
    dtype: DTypeLike = jnp.float32
    shortcut: str = "C"  # a key of SHORTCUTS

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
                    shortcut=self.shortcut,
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
    depth: int, *, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32
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


# He et al. 2016, Sec. 4.2: depth 6n + 2 -> (blocks per stage, the reference yaml's shortcut).
CIFAR_RESNET_CONFIGS: dict[int, tuple[tuple[int, int, int], str]] = {
    20: ((3, 3, 3), "B"),
    32: ((5, 5, 5), "C"),
    56: ((9, 9, 9), "C"),
    110: ((18, 18, 18), "C"),
}

#: The first-stage width the reference actually builds for ``resnet20/32/56/110`` (see the
#: module docstring; the paper's is 16).
CIFAR_RESNET_DEFAULT_WIDTH = 64


def cifar_resnet(
    depth: int, *, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32
) -> ResNet:
    """Factory for the registry: the three-stage CIFAR ResNet-``depth`` of He et al. 2016
    (basic blocks, widths ``w, 2w, 4w``) with ``w = width``; the default ``w = 64`` is what
    the reference builds, ``width=16`` is the paper's network."""
    stage_sizes, shortcut = CIFAR_RESNET_CONFIGS[depth]
    return ResNet(
        stage_sizes=stage_sizes,
        block_cls=BasicBlock,
        num_classes=num_classes,
        width=CIFAR_RESNET_DEFAULT_WIDTH if width is None else width,
        strides=(1, 2, 2),
        dtype=dtype,
        shortcut=shortcut,
    )
