"""A drop-in ``lax.conv_general_dilated`` whose filter gradient XLA:CPU computes in batch chunks.

The gradient of a convolution with respect to its filter is itself a convolution that
contracts over every output pixel of the batch: K = images x H_out x W_out terms per filter
entry. XLA:CPU (jax 0.10) runs that contraction far below its forward speed once K is large.
Measured on the 2-core development machine for 3x3 filters on 32x32 inputs: 32 images at 64
channels take 556 ms in one piece and 109 ms as four 8-image chunks (the forward convolution:
45 ms); 128 images at 16 channels take 193 ms in one piece and 13 ms in 8-image chunks. For
whole ResNet-18 steps see README "Performance".

Mathematically nothing changes: with x = [x_1; ...; x_C] split along the batch,

    dL/dw = sum_c conv_filter_grad(x_c, dL/dy_c),

which is how the tangent of the convolution with respect to the filter is written here
(``jax.custom_jvp``), so reverse mode, forward mode and forward-over-reverse (the penalty's
``method="jvp"``) all keep working; the forward pass and the input gradient are XLA's own.
Chunking applies only when the default backend is the CPU; elsewhere (GPUs) and for grouped,
dilated or string-padded convolutions this is exactly ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

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
        per_chunk = images_per_chunk(lhs.shape[batch_axis], out_pixels, CPU_CHUNK_PIXELS)
        chunks = jnp.split(lhs, lhs.shape[batch_axis] // per_chunk, axis=batch_axis)
        filter_dot = jnp.concatenate([conv(chunk, rhs_dot) for chunk in chunks], out_batch_axis)
        out_dot = filter_dot if out_dot is None else out_dot + filter_dot
    if out_dot is None:
        out_dot = jnp.zeros_like(out)
    return out, out_dot


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
