"""Building blocks shared by the model zoo: initializers, conv/BN/dense helpers, pooling.

Conventions used everywhere in :mod:`gdreg.models`:

* Inputs are NHWC. 3x3 convolutions use explicit symmetric padding of 1 (PyTorch's
  ``padding=1``), not Flax's ``"SAME"``, which pads asymmetrically for stride 2.
* Parameters are always float32 (``param_dtype``); ``dtype`` is the compute dtype.
* BatchNorm (:class:`BatchNorm`): ``epsilon=1e-5``, scale 1 / bias 0. In train mode a layer
  writes its block's *batch* statistics (mean and PyTorch's unbiased variance) to the
  ``batch_stats`` collection; the running averages that evaluation uses are kept by the
  training engine (:mod:`gdreg.batchnorm`), which decides how the statistics of many forward
  passes are combined.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdreg.models.conv import conv_general_dilated as chunked_filter_grad_conv
from gdreg.types import Dtype

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

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = PARAM_DTYPE) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def conv(
    features: int,
    kernel: int,
    *,
    dtype: Dtype,
    strides: int = 1,
    use_bias: bool = False,
    kernel_init: nn.initializers.Initializer = kaiming_normal_fan_out,
    bias_init: nn.initializers.Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> nn.Conv:
    """A square convolution with PyTorch-style padding ``kernel // 2`` on every side.

    Its filter gradient is summed over batch chunks on CPU (:mod:`gdreg.models.conv`).
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
        conv_general_dilated=chunked_filter_grad_conv,
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
    :func:`gdreg.experiment.recompute_statistics` sums over a data set; centring on ``c`` keeps
    the variance accurate). Keeping the momentum out of the layer
    lets the caller combine the statistics of many forward passes in any order-exact way
    (:mod:`gdreg.batchnorm`); the variables keep Flax's names and shapes (``scale``, ``bias``;
    ``mean``, ``var``).
    """

    use_running_average: bool
    dtype: Dtype | None = jnp.float32  # None: the inputs' and parameters' promoted dtype

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


def batch_norm(train: bool, *, dtype: Dtype | None, name: str | None = None) -> BatchNorm:
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
    dtype: Dtype,
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


def torch_dense(features: int, fan_in: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
    """A linear layer with PyTorch's default ``nn.Linear`` initialization (weight and bias)."""
    return dense(
        features,
        dtype=dtype,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        name=name,
    )
