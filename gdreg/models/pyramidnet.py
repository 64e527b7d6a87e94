"""PyramidNet (Han et al. 2017, "Deep Pyramidal Residual Networks"), CIFAR version, as
configured in the reference (config/model/pyramidnet110.yaml: depth 110, alpha 84, basic
blocks; pyramidnet272.yaml: depth 272, alpha 200, bottlenecks; fullbatch/models/pyramidnets.py,
itself from Han's PyramidNet-PyTorch).

* Stem: 3x3 conv (no bias) to ``w = 16`` channels -> BN, no ReLU.
* Three stages of ``n`` blocks, strides 1, 2, 2; ``n = (depth - 2) // 6`` basic blocks or
  ``(depth - 2) // 9`` bottlenecks. The width grows by ``alpha / (3 n)`` at every block: with
  ``d_0 = w`` and ``d_k = d_(k-1) + alpha / (3 n)`` (accumulated in float64 one block after
  another, as the reference does), block ``k`` has ``round(d_k)`` planes (Python's ``round``,
  half to even), so the last block has ``w + alpha`` planes (times 4 for bottlenecks).
* Basic block: BN -> 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN. Bottleneck:
  BN -> 1x1 conv -> BN -> ReLU -> 3x3 conv (stride) -> BN -> ReLU -> 1x1 conv (4x) -> BN.
  No ReLU after the sum.
* Shortcut: the identity, after a 2x2 average pool (stride 2, partial windows kept, as
  PyTorch's ``ceil_mode=True``) when the block is strided, zero-padded along the channels to
  the block's output width: no parameters.
* Head: BN -> ReLU -> global average pool -> linear. The reference pools with
  ``AvgPool2d(8)``, which is the global average for 32x32 inputs (an 8x8 last map); the
  global average also serves other input sizes.
* Init as the reference's: convs N(0, 2 / (k * k * out_channels)) (Kaiming-normal fan_out),
  BN 1/0, linear PyTorch's default ``nn.Linear`` init.

``width`` (default 16) is the stem width; ``alpha`` is scaled by ``width / 16`` with it, so
every width is the reference's times ``width / 16`` up to rounding, and ``width=16`` is the
reference's network exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from gdreg.models import layers

# depth -> (alpha, bottleneck), as config/model/pyramidnet{110,272}.yaml.
PYRAMIDNET_CONFIGS: dict[int, tuple[float, bool]] = {
    110: (84.0, False),
    272: (200.0, True),
}
DEFAULT_WIDTH = 16


def pyramid_planes(depth: int, alpha: float, bottleneck: bool, width: int) -> list[list[int]]:
    """Planes of every block, per stage: the reference's ``pyramidal_make_layer`` schedule.

    ``d_0 = width``, ``d_k = d_(k-1) + alpha / (3 n)`` in float64, block ``k`` has
    ``round(d_k)`` planes (``n`` blocks per stage, see the module docstring).
    """
    blocks_per_stage = (depth - 2) // 9 if bottleneck else (depth - 2) // 6
    if blocks_per_stage < 1:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"depth {depth} leaves no {kind} blocks in a PyramidNet stage")
    add_rate = alpha / (3 * blocks_per_stage * 1.0)
    featuremap_dim: float = width
    stages = []
    for _ in range(3):
        stage = []
        for _ in range(blocks_per_stage):
            featuremap_dim = featuremap_dim + add_rate
            stage.append(round(featuremap_dim))  # a float: an int, half to even
        stages.append(stage)
    return stages


class PyramidBasicBlock(nn.Module):
    """BN -> 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN."""

    planes: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = layers.batch_norm(train, dtype=self.dtype, name="bn1")(x)
        y = layers.conv(self.planes, 3, strides=self.strides, dtype=self.dtype, name="conv1")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn2")(y)
        y = nn.relu(y)
        y = layers.conv(self.planes, 3, dtype=self.dtype, name="conv2")(y)
        return layers.batch_norm(train, dtype=self.dtype, name="bn3")(y)


class PyramidBottleneck(nn.Module):
    """BN -> 1x1 conv -> BN -> ReLU -> 3x3 conv (stride) -> BN -> ReLU -> 1x1 conv (4x) -> BN."""

    planes: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = layers.batch_norm(train, dtype=self.dtype, name="bn1")(x)
        y = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn2")(y)
        y = nn.relu(y)
        y = layers.conv(self.planes, 3, strides=self.strides, dtype=self.dtype, name="conv2")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn3")(y)
        y = nn.relu(y)
        y = layers.conv(4 * self.planes, 1, dtype=self.dtype, name="conv3")(y)
        return layers.batch_norm(train, dtype=self.dtype, name="bn4")(y)


def pyramid_shortcut(x: jax.Array, strides: int, out_features: int) -> jax.Array:
    """The parameter-free shortcut: average pool when strided, then zero channels appended."""
    if strides != 1:
        x = layers.avg_pool_ceil(x, strides)
    missing = out_features - x.shape[-1]
    if missing < 0:
        raise ValueError(f"a PyramidNet block narrows {x.shape[-1]} -> {out_features} channels")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, missing)])


class PyramidNet(nn.Module):
    """CIFAR PyramidNet with ``depth`` layers, widening ``alpha`` and stem width ``width``."""

    depth: int
    alpha: float
    num_classes: int
    bottleneck: bool = False
    width: int = DEFAULT_WIDTH
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        x = layers.conv(self.width, 3, dtype=self.dtype, name="stem_conv")(x)
        x = layers.batch_norm(train, dtype=self.dtype, name="stem_bn")(x)
        block_cls = PyramidBottleneck if self.bottleneck else PyramidBasicBlock
        expansion = 4 if self.bottleneck else 1
        stages: Sequence[list[int]] = pyramid_planes(
            self.depth, self.alpha, self.bottleneck, self.width
        )
        for i, (stage, stride) in enumerate(zip(stages, (1, 2, 2), strict=True)):
            for j, planes in enumerate(stage):
                strides = stride if j == 0 else 1
                y = block_cls(
                    planes, strides=strides, dtype=self.dtype, name=f"stage{i + 1}_block{j + 1}"
                )(x, train)
                x = y + pyramid_shortcut(x, strides, expansion * planes)
        x = layers.batch_norm(train, dtype=self.dtype, name="final_bn")(x)
        x = nn.relu(x)
        x = layers.global_avg_pool(x)
        x = layers.torch_dense(self.num_classes, x.shape[-1], dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def pyramidnet(
    depth: int, *, num_classes: int, width: int | None = None, dtype: DTypeLike = jnp.float32
) -> PyramidNet:
    """Factory for the registry: the reference's PyramidNet-``depth``; ``width`` is the stem
    width (default 16), and the widening ``alpha`` scales with it by ``width / 16``."""
    alpha, bottleneck = PYRAMIDNET_CONFIGS[depth]
    width = DEFAULT_WIDTH if width is None else width
    return PyramidNet(
        depth=depth,
        alpha=alpha * width / DEFAULT_WIDTH,
        num_classes=num_classes,
        bottleneck=bottleneck,
        width=width,
        dtype=dtype,
    )
