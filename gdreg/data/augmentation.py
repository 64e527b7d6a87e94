"""Data augmentation on the device (pure JAX): normalization, random crops and flips.

The whole base training set lives on the device (uint8) and :func:`augment` produces the
augmented views of any set of *virtual* indices. Each view is a function of
``(key, step, v)`` only (``"random"``) or of ``(key, v)`` only (``"fixed"``), never of the
batch, the device or the number of devices that processes it:

* ``"none"``: virtual size N, view v is base image v.
* ``"random"``: virtual size N, view v is base image v, zero-padded by ``padding`` pixels
  on each side, cropped back to the original size at offsets uniform in
  ``[0, 2 * padding]``, and flipped horizontally with probability 1/2 (if ``flip``), all
  drawn from ``fold_in(fold_in(key, step), v)``: a fresh augmentation every step.
* ``"fixed"``: virtual size ``N * copies``, view v is base image ``v % N`` with a crop and
  flip drawn from ``fold_in(key, v)``: the paper's fixed "N x CIFAR" dataset, without
  ever materializing the copies. Every copy is augmented (copy 0 included).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from gdreg.data import AUGMENTATIONS


def normalization_table(
    mean: Sequence[float], std: Sequence[float], channels: int | None = None
) -> np.ndarray:
    """float64 ``[256, C]``: entry ``[v, c] = (v / 255 - mean[c]) / std[c]``.

    Computed on the host by numpy, one correctly rounded IEEE division, subtraction and
    division per entry (no reciprocals, no fused multiply-adds), so every x86-64 CPU, and
    every other machine with IEEE float64, gets the same bits. ``mean`` and ``std`` broadcast
    to ``channels`` (default: their length).
    """
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    channels = max(mean.size, std.size) if channels is None else int(channels)
    mean, std = np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,))
    values = np.arange(256, dtype=np.float64)[:, None]
    # Three separate numpy operations: numpy never contracts them into an FMA.
    return (values / 255.0 - mean) / std


def input_dtype(model_dtype: DTypeLike) -> np.dtype:
    """The dtype of a model's normalized inputs: float64 for a float64 model with
    ``jax_enable_x64`` on (checked when called, i.e. when a batch function is traced), else
    float32. bfloat16 and float16 models keep float32 inputs (they cast them on entry, as
    their parameters are float32 too)."""
    if jnp.dtype(model_dtype) == jnp.float64:
        return jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 with x64 off
    return np.dtype(np.float32)


def normalize(
    images: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: DTypeLike = jnp.float32
) -> jax.Array:
    """uint8 images ``[..., C]`` -> ``(x / 255 - mean) / std`` in ``dtype``.

    Each entry is the float64 value of :func:`normalization_table` rounded once to ``dtype``
    (on the host), looked up by pixel value. No arithmetic on the images runs on the device,
    so the result is the same bits on every CPU and accelerator and wherever XLA places (or
    duplicates) the lookup inside a program. Written as the formula, XLA would compute
    ``x * (1/255) - mean`` times ``1/std`` (its algebraic simplifier turns a division by a
    constant into a multiplication) and may contract the multiply-add into an FMA, which
    depends on the code it generates for the CPU at hand; see :func:`input_dtype` for the
    dtype a model's batches use.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    channels = images.shape[-1]
    table = normalization_table(mean, std, channels)
    table = table.astype(jax.dtypes.canonicalize_dtype(dtype)).reshape(-1)  # one rounding
    # Entry (v, c) of the table sits at v * C + c of the flat table.
    flat_index = images.astype(jnp.int32) * channels + jnp.arange(channels, dtype=jnp.int32)
    return jnp.take(jnp.asarray(table), flat_index, mode="clip")


def _check_augmentation(augmentation: str, copies: int) -> None:
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation={augmentation!r} is not known; choose one of {AUGMENTATIONS}"
        )
    if int(copies) < 1:
        raise ValueError(f"copies={copies} must be >= 1")


def virtual_size(num_images: int, augmentation: str, copies: int) -> int:
    """Size of the virtual training set: ``num_images * copies`` for "fixed", else N.

    ``copies`` is validated (>= 1) but only used by "fixed".
    """
    _check_augmentation(augmentation, copies)
    return int(num_images) * (int(copies) if augmentation == "fixed" else 1)


def _view_keys(key: jax.Array, step: jax.Array, virtual_indices: jax.Array, augmentation: str):
    """One PRNG key per virtual index: ``fold_in(fold_in(key, step), v)`` or ``fold_in(key, v)``."""
    base = jax.random.fold_in(key, step) if augmentation == "random" else key
    return jax.vmap(lambda v: jax.random.fold_in(base, v))(virtual_indices)


def _check_padding(padding: int) -> None:
    if int(padding) < 0:
        raise ValueError(f"padding={padding} must be >= 0")


def augmentation_params(
    key: jax.Array,
    step: jax.Array,
    virtual_indices: jax.Array,
    *,
    augmentation: str,
    padding: int = 4,
    flip: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The crop offsets and flips that :func:`augment` applies to ``virtual_indices``.

    Returns ``(dy, dx, flipped)``: int32 ``[n]`` offsets of the crop's top-left corner in
    the zero-padded image (``[0, 2 * padding]``; ``padding`` = no shift) and bool ``[n]``.
    For "none" that is ``(padding, padding, False)``. The view of v is
    ``padded[dy:dy + H, dx:dx + W]``, then mirrored left-right if ``flipped``.
    """
    _check_augmentation(augmentation, 1)
    _check_padding(padding)
    return _augmentation_params(
        key,
        jnp.asarray(step, jnp.int32),
        jnp.asarray(virtual_indices, jnp.int32),
        augmentation=augmentation,
        padding=int(padding),
        flip=bool(flip),
    )


@functools.partial(jax.jit, static_argnames=("augmentation", "padding", "flip"))
def _augmentation_params(key, step, virtual_indices, *, augmentation, padding, flip):
    n = virtual_indices.shape[0]
    if augmentation == "none":
        offset = jnp.full((n,), padding, jnp.int32)
        return offset, offset, jnp.zeros((n,), bool)
    keys = _view_keys(key, step, virtual_indices, augmentation)

    def draw(k):
        # One threefry call per view (cheap to compile and run): three uint32 words give
        # dy, dx (uniform in [0, 2 * padding] up to a modulo bias below 1e-8) and the flip.
        bits = jax.random.bits(k, (3,), jnp.uint32)
        dy, dx = (bits[:2] % jnp.uint32(2 * padding + 1)).astype(jnp.int32)
        flipped = (bits[2] >> 31).astype(bool) if flip else jnp.zeros((), bool)
        return dy, dx, flipped

    return jax.vmap(draw)(keys)


def crop_and_flip(
    images: jax.Array, dy: jax.Array, dx: jax.Array, flipped: jax.Array, *, padding: int
) -> jax.Array:
    """Zero-pads ``images [n, H, W, C]`` by ``padding``, crops ``H x W`` at ``(dy, dx)``, flips."""
    _, h, w, c = images.shape
    if padding > 0:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        # The channel offset in the offsets' own dtype (a Python 0 is int64 under x64).
        images = jax.vmap(
            lambda img, y, x: jax.lax.dynamic_slice(img, (y, x, jnp.zeros_like(y)), (h, w, c))
        )(padded, dy, dx)
    return jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)


def augment(
    images: jax.Array,
    labels: jax.Array,
    virtual_indices: jax.Array,
    step: jax.Array,
    *,
    key: jax.Array,
    augmentation: str,
    copies: int = 1,
    padding: int = 4,
    flip: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Augmented views (uint8) and labels of ``virtual_indices`` (int32 ``[n]``).

    ``images`` uint8 ``[N, H, W, C]`` and ``labels`` ``[N]`` are the whole base training
    set. View v shows base image ``v % N`` (for "none"/"random" v < N is expected); see
    the module docstring for how each mode draws its crop and flip. ``augmentation``,
    ``copies``, ``padding`` and ``flip`` are static; ``step`` and ``key`` may be traced.
    ``copies`` is only validated here (the caller draws v below ``virtual_size``).
    The work is a jitted function (compiled once per shape when called eagerly, inlined
    when called under an outer ``jit``/``shard_map``).
    """
    _check_augmentation(augmentation, copies)
    _check_padding(padding)
    return _augment(
        images,
        labels,
        jnp.asarray(virtual_indices, jnp.int32),
        jnp.asarray(step, jnp.int32),
        key,
        augmentation=augmentation,
        padding=int(padding),
        flip=bool(flip),
    )


@functools.partial(jax.jit, static_argnames=("augmentation", "padding", "flip"))
def _augment(images, labels, virtual_indices, step, key, *, augmentation, padding, flip):
    base = virtual_indices % images.shape[0]
    views = jnp.take(images, base, axis=0)
    out_labels = jnp.take(labels, base, axis=0)
    if augmentation == "none":
        return views, out_labels
    dy, dx, flipped = _augmentation_params(
        key, step, virtual_indices, augmentation=augmentation, padding=padding, flip=flip
    )
    return crop_and_flip(views, dy, dx, flipped, padding=padding), out_labels
