"""Name -> model factory registry.

A factory is called as ``factory(num_classes=..., width=..., dtype=...)`` with ``width``
either ``None`` (use the architecture's default) or a positive int, and ``dtype`` a
``jnp.dtype`` (the compute dtype; parameters stay float32). It returns a
``flax.linen.Module`` whose ``__call__(x, train)`` maps NHWC floats to float32 logits.

Names are case-insensitive (``create_model("ResNet18", ...)`` works).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdreg.models import densenet, nfnet, pyramidnet, resnet, small, vgg

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def _normalize(name: str) -> str:
    return name.strip().lower()


def register_model(name: str, factory: ModelFactory, *, overwrite: bool = False) -> None:
    """Register ``factory`` under ``name`` (case-insensitive).

    Registering a name that is already taken by a *different* factory raises ``ValueError``
    unless ``overwrite=True``; registering the same factory object again is a no-op.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"model factory for {name!r} must be callable, got {factory!r}")
    key = _normalize(name)
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not factory and not overwrite:
        raise ValueError(f"name {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def model_names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def check_name(name: str) -> str:
    """The registry key of ``name`` (case-insensitive); ``ValueError`` if no model has it."""
    key = _normalize(name) if isinstance(name, str) else None
    if key not in _REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; known models: {model_names()}")
    return key


#: The compute dtypes a model may take (``model.dtype``). float8 and float4 kinds are not
#: among them: without scaling, a model computing in them does not learn.
DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_dtype(dtype: str | Any) -> jnp.dtype:
    """``dtype`` as a ``jnp.dtype``, one of :data:`DTYPES`; ``ValueError`` for anything else.

    ``float64`` needs JAX's 64-bit mode (``JAX_ENABLE_X64=1``, or inside
    ``jax.enable_x64``): without it JAX computes in float32 whatever the model asks for.
    """
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype: unknown dtype {dtype!r}") from err
    if dt.name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dt.name}")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype='float64' needs JAX's 64-bit mode, which is off: the model would compute in "
            "float32; set JAX_ENABLE_X64=1 to compute in float64, or use float32"
        )
    return dt


def create_model(
    name: str,
    *,
    num_classes: int,
    width: int | None = None,
    dtype: str | jnp.dtype = "float32",
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
      name: a name from :func:`model_names` (case-insensitive).
      num_classes: number of logits.
      width: what it scales is the family's (``None``: the architecture's default, in
        brackets): ResNet stem and first-stage channels (64), DenseNet growth rate (32; 48 for
        densenet161), VGG first-stage channels (64), PyramidNet stem channels with the
        widening ``alpha`` scaled alike (16), NFNet first-stage channels (256, a multiple of
        16), small CNN channels (32), the linear model's number of input entries (100).
      dtype: compute dtype, e.g. ``"float32"`` or ``"bfloat16"``; parameters are float32 and
        logits are returned as float32 either way.
    """
    key = check_name(name)
    if not _is_positive_int(num_classes):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if width is not None and not _is_positive_int(width):
        raise ValueError(f"width must be a positive integer or None, got {width!r}")
    return _REGISTRY[key](
        num_classes=int(num_classes),
        width=None if width is None else int(width),
        dtype=check_dtype(dtype),
    )


def _is_positive_int(value: Any) -> bool:
    """True for Python / numpy integers > 0 (not bools, not floats)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _register_builtins() -> None:
    for depth in sorted(resnet.RESNET_CONFIGS):
        register_model(f"resnet{depth}", functools.partial(resnet.resnet, depth))
    for depth in sorted(resnet.CIFAR_RESNET_CONFIGS):
        register_model(f"resnet{depth}", functools.partial(resnet.cifar_resnet, depth))
    for depth in sorted(densenet.DENSENET_CONFIGS):
        register_model(f"densenet{depth}", functools.partial(densenet.densenet, depth))
    for depth in sorted(vgg.VGG_CONFIGS):
        register_model(f"vgg{depth}", functools.partial(vgg.vgg, depth))
        register_model(f"vgg{depth}_nobn", functools.partial(vgg.vgg, depth, batch_norm=False))
    for depth in sorted(pyramidnet.PYRAMIDNET_CONFIGS):
        register_model(f"pyramidnet{depth}", functools.partial(pyramidnet.pyramidnet, depth))
    register_model("nfnet", nfnet.nfnet)
    register_model("linear", small.linear)
    register_model("convnet1", small.convnet1)
    register_model("convnet2", small.convnet2)


_register_builtins()
