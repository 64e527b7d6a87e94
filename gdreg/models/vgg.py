"""VGG-11/13/16/19, CIFAR variant (as in the reference, "head: CIFAR"), with or without BN.

* Conv stack: 3x3 conv (padding 1, with bias) -> BN -> ReLU per entry of the configuration
  (``vgg11`` ...; the reference's config/model/vgg*.yaml, ``normalization: BatchNorm2d``),
  or 3x3 conv -> ReLU without BN (``vgg11_nobn`` ...: the reference's VGG with
  ``model.normalization=Identity``, which its ``get_layer_functions`` turns into
  ``torch.nn.Identity``; no yaml of theirs ships it, it is an override of theirs),
  2x2 max-pool (stride 2) at each "M"; channel multipliers of the base width ``w``
  (64 by default): ``w, 2w, 4w, 8w, 8w``.
* Classifier: a single linear layer ``8w -> num_classes`` (no hidden fully connected
  layers, no dropout). In the reference it is applied to the flattened 1x1x512 map that five
  poolings leave of a 32x32 input; here it is applied to the global average of the last
  feature map, which is the same thing at 32x32 and also works for other input sizes
  (the pools keep a partial last window instead of dropping it, so an 8x8 input ends 1x1).
* Init as the reference's ``classical_weight_init``: convs Kaiming-normal fan_out with bias
  0, BN 1/0, linear N(0, 0.01) with bias 0.

Reference: fullbatch/models/vgg.py (``VGG``) and fullbatch/models/utils.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from gdreg.models import layers

# Channel multipliers of the base width; "M" = 2x2 max-pool with stride 2.
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    13: (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    16: (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
    19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"),
}


class VGG(nn.Module):
    config: Sequence[int | str]
    num_classes: int
    width: int = 64
    dtype: DTypeLike = jnp.float32
    batch_norm: bool = True  # False: conv -> ReLU (the reference's normalization=Identity)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        conv_idx = 0
        for entry in self.config:
            if entry == "M":
                x = layers.max_pool_ceil(x, 2)
                continue
            conv_idx += 1
            x = layers.conv(
                int(entry) * self.width,
                3,
                dtype=self.dtype,
                use_bias=True,
                kernel_init=layers.kaiming_normal_fan_out,
                bias_init=nn.initializers.zeros,
                name=f"conv{conv_idx}",
            )(x)
            if self.batch_norm:
                x = layers.batch_norm(train, dtype=self.dtype, name=f"bn{conv_idx}")(x)
            x = nn.relu(x)
        x = layers.global_avg_pool(x)
        x = layers.dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(stddev=0.01),
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(x)
        return x.astype(jnp.float32)


def vgg(
    depth: int,
    *,
    num_classes: int,
    width: int | None = None,
    dtype: DTypeLike = jnp.float32,
    batch_norm: bool = True,
) -> VGG:
    """Factory for the registry: VGG-``depth`` (with BN unless ``batch_norm=False``),
    first-stage width ``width`` (default 64; the stages have ``w, 2w, 4w, 8w, 8w``)."""
    return VGG(
        config=VGG_CONFIGS[depth],
        num_classes=num_classes,
        width=64 if width is None else width,
        dtype=dtype,
        batch_norm=batch_norm,
    )
