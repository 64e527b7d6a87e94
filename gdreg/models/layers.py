"""Building blocks shared by the model zoo: initializers, conv/BN/dense helpers, pooling.

Conventions used everywhere in :mod:`gdreg.models`:

* Inputs are NHWC. 3x3 convolutions use explicit symmetric padding of 1 (PyTorch's
  ``padding=1``), not Flax's ``"SAME"``, which pads asymmetrically for stride 2.
* Parameters are always float32 (``param_dtype``); ``dtype`` is the compute dtype.
* BatchNorm (:class:`BatchNorm`): ``epsilon=1e-5``, scale 1 / bias 0. In train mode a layer
  writes its block's *batch* statistics (mean and PyTorch's unbiased variance) to the
  ``batch_stats`` collection; the running averages that evaluation uses are kept by the
  training engine (:mod:`gdreg.engine.running_statistics`), which decides how the statistics of many
  forward passes are combined.
* Convolutions (:func:`conv`) use :func:`conv_general_dilated`, a drop-in for
  ``lax.conv_general_dilated`` whose filter gradient XLA:CPU computes in batch chunks (below).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import DTypeLike

PARAM_DTYPE = jnp.float32

#: The collection in which eval-mode BatchNorm layers report the moments of their inputs (when
#: the caller makes it mutable; see :class:`BatchNorm`).
MOMENTS = "batch_moments"

# torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.init.kaiming_normal_(w) with its defaults (fan_in, leaky_relu a=0): N(0, 2 / fan_in).
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's default Conv2d / Linear weight init, kaiming_uniform_(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for Conv2d / Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = PARAM_DTYPE) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def conv(
    features: int,
    kernel: int,
    *,
    dtype: DTypeLike,
    strides: int = 1,
    use_bias: bool = False,
    kernel_init: nn.initializers.Initializer = kaiming_normal_fan_out,
    bias_init: nn.initializers.Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> nn.Conv:
    """A square convolution with PyTorch-style padding ``kernel // 2`` on every side.

    Its filter gradient is summed over batch chunks on CPU (:func:`conv_general_dilated`).
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        kernel_init=kernel_init,
        bias_init=bias_init,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


class BatchNorm(nn.Module):
    """BatchNorm that reports its batch statistics instead of updating a running average.

    Train mode normalizes with the batch's mean and biased variance (as PyTorch and Flax do)
    and, when ``batch_stats`` is mutable, stores the batch mean and the *unbiased* variance
    ``var * n / (n - 1)`` (``n`` values per channel): the quantities PyTorch's
    ``BatchNorm2d`` feeds into its running averages (torch.nn.functional.batch_norm).
    Eval mode normalizes with the stored statistics; when the :data:`MOMENTS` collection is
    mutable it also reports the moments of its input about the stored mean ``c``:
    ``mean(x - c)``, ``mean((x - c)^2)`` and the count per channel (what
    :func:`gdreg.program.experiment.recompute_statistics` sums over a data set; centring on ``c``
    keeps the variance accurate). Keeping the momentum out of the layer
    lets the caller combine the statistics of many forward passes in any order-exact way
    (:mod:`gdreg.engine.running_statistics`); the variables keep Flax's names and shapes (``scale``,
    ``bias``; ``mean``, ``var``).
    """

    use_running_average: bool
    dtype: DTypeLike | None = jnp.float32  # None: the inputs' and parameters' promoted dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # momentum 0: Flax stores exactly the batch statistics (0 * old + 1 * new).
        inner = nn.BatchNorm(
            use_running_average=self.use_running_average,
            momentum=0.0,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            scale_init=nn.initializers.ones,
            bias_init=nn.initializers.zeros,
        )
        nn.share_scope(self, inner)
        y = inner(x)
        if (
            self.use_running_average
            and not self.is_initializing()
            and self.is_mutable_collection(MOMENTS)
        ):
            dtype = jnp.promote_types(x.dtype, jnp.float32)
            shift = jnp.asarray(self.get_variable("batch_stats", "mean"), dtype)
            centered = jnp.asarray(x, dtype) - shift
            axes = tuple(range(x.ndim - 1))
            self.put_variable(MOMENTS, "mean", jnp.mean(centered, axes))
            self.put_variable(MOMENTS, "square", jnp.mean(jnp.square(centered), axes))
            self.put_variable(MOMENTS, "count", jnp.asarray(x.size // x.shape[-1], dtype))
        if (
            not self.use_running_average
            and not self.is_initializing()
            and self.is_mutable_collection("batch_stats")
        ):
            count = x.size // x.shape[-1]
            biased = self.get_variable("batch_stats", "var")
            self.put_variable("batch_stats", "var", biased * (count / max(count - 1, 1)))
        return y


def batch_norm(train: bool, *, dtype: DTypeLike | None, name: str | None = None) -> BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics in train mode, stored ones in eval."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W ([N, H, W, C] -> [N, C]); the sum is taken in float32 (or float64)."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)


def avg_pool_ceil(x: jax.Array, window: int) -> jax.Array:
    """Average pool with window = stride; equals PyTorch ``AvgPool2d(window, window)`` on sizes
    divisible by ``window``. On other sizes the partial last window is kept (averaged over the
    real pixels only), so the result has ``ceil(size / window)`` pixels, the same size as a
    strided 3x3 convolution with padding 1 produces."""
    if window == 1:
        return x
    return nn.avg_pool(
        x, (window, window), strides=(window, window), padding="SAME", count_include_pad=False
    )


def max_pool_ceil(x: jax.Array, window: int = 2) -> jax.Array:
    """Max pool with window = stride; equals PyTorch ``MaxPool2d(window, window)`` on sizes
    divisible by ``window``, keeps a partial last window otherwise (never shrinks below 1 pixel)."""
    return nn.max_pool(x, (window, window), strides=(window, window), padding="SAME")


def dense(
    features: int,
    *,
    dtype: DTypeLike,
    kernel_init: nn.initializers.Initializer = torch_default_kernel_init,
    bias_init: nn.initializers.Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )


def torch_dense(
    features: int, fan_in: int, *, dtype: DTypeLike, name: str | None = None
) -> nn.Dense:
    """A linear layer with PyTorch's default ``nn.Linear`` initialization (weight and bias)."""
    return dense(
        features,
        dtype=dtype,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        name=name,
    )


# ----- the convolution: its filter gradient in batch chunks on CPU --------------------
#
# A drop-in ``lax.conv_general_dilated`` whose filter gradient XLA:CPU computes in batch chunks.
#
# The gradient of a convolution with respect to its filter is itself a convolution that
# contracts over every output pixel of the batch: K = images x H_out x W_out terms per filter
# entry. XLA:CPU (jax 0.10) runs that contraction far below its forward speed once K is large.
# Measured on the 2-core development machine for 3x3 filters on 32x32 inputs: 32 images at 64
# channels take 556 ms in one piece and 109 ms as four 8-image chunks (the forward convolution:
# 45 ms); 128 images at 16 channels take 193 ms in one piece and 13 ms in 8-image chunks. For
# whole ResNet-18 steps see docs/performance.md.
#
# Mathematically nothing changes: with x = [x_1; ...; x_C] split along the batch,
#
#     dL/dw = sum_c conv_filter_grad(x_c, dL/dy_c),
#
# which is how the tangent of the convolution with respect to the filter is written here
# (``jax.custom_jvp``), so reverse mode, forward mode and forward-over-reverse (the penalty's
# ``method="jvp"``) all keep working; the forward pass and the input gradient are XLA's own.
# Chunking applies only when the default backend is the CPU; elsewhere (GPUs) and for grouped,
# dilated or string-padded convolutions this is exactly ``lax.conv_general_dilated``.

# Output pixels per chunk of the filter-gradient contraction on CPU (8 CIFAR images at 32x32).
# Measured on XLA:CPU, 2 cores: 2,048 to 8,192 were the fastest for 32x32 and 16x16 layers.
CPU_CHUNK_PIXELS = 8192


def images_per_chunk(num_images: int, pixels_per_image: int, budget: int) -> int:
    """The largest divisor of ``num_images`` whose chunk has at most ``budget`` pixels (>= 1)."""
    per_chunk = max(1, min(num_images, budget // max(1, pixels_per_image)))
    while num_images % per_chunk:
        per_chunk -= 1
    return per_chunk


def _native(lhs, rhs, window_strides, padding, dimension_numbers):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _chunked_conv(lhs, rhs, window_strides, padding, dimension_numbers):
    return _native(lhs, rhs, window_strides, padding, dimension_numbers)


def _chunked_conv_jvp(window_strides, padding, dimension_numbers, primals, tangents):
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    conv = functools.partial(
        _native,
        window_strides=window_strides,
        padding=padding,
        dimension_numbers=dimension_numbers,
    )
    out = conv(lhs, rhs)
    out_dot = None
    if not isinstance(lhs_dot, SymbolicZero):
        out_dot = conv(lhs_dot, rhs)
    if not isinstance(rhs_dot, SymbolicZero):
        # The tangent is linear in rhs_dot; its transpose (the filter gradient) is the sum of
        # the per-chunk filter gradients.
        batch_axis = dimension_numbers.lhs_spec[0]
        out_batch_axis = dimension_numbers.out_spec[0]
        out_pixels = 1
        for axis in dimension_numbers.out_spec[2:]:
            out_pixels *= out.shape[axis]
        images = lhs.shape[batch_axis]
        count = images // images_per_chunk(images, out_pixels, CPU_CHUNK_PIXELS)
        # Chunk c holds images c, c + count, c + 2 count, ...: a batch sharded over devices in
        # contiguous slices (an SGD step under jit) gives every chunk the same share on every
        # device, so no image moves between devices (contiguous chunks made XLA move them: 200
        # collective-permutes in each SGD step of ResNet-18 on 2 CPU devices).
        strided = lhs.reshape(_split_axis(lhs.shape, batch_axis, count))
        tangents = [
            conv(lax.index_in_dim(strided, c, batch_axis + 1, keepdims=False), rhs_dot)
            for c in range(count)
        ]
        filter_dot = jnp.stack(tangents, out_batch_axis + 1).reshape(out.shape)
        out_dot = filter_dot if out_dot is None else out_dot + filter_dot
    if out_dot is None:
        out_dot = jnp.zeros_like(out)
    return out, out_dot


def _split_axis(shape: tuple[int, ...], axis: int, count: int) -> tuple[int, ...]:
    """``shape`` with ``shape[axis]`` split into ``(shape[axis] // count, count)``."""
    return (*shape[:axis], shape[axis] // count, count, *shape[axis + 1 :])


_chunked_conv.defjvp(_chunked_conv_jvp, symbolic_zeros=True)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type=None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with the filter gradient summed over batch chunks on CPU.

    Same arguments and same values as ``lax.conv_general_dilated`` (pass it to
    ``flax.linen.Conv(conv_general_dilated=...)``); see the module docstring for why.
    """
    dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = (
        jax.default_backend() != "cpu"
        or isinstance(padding, str)
        or feature_group_count != 1
        or batch_group_count != 1
        or precision is not None
        or preferred_element_type is not None
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
    )
    if plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    padding = tuple((int(low), int(high)) for low, high in padding)
    return _chunked_conv(lhs, rhs, tuple(window_strides), padding, dimension_numbers)
