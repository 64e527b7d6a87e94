"""The CPU convolution whose filter gradient is summed over batch chunks
(gdreg.models.layers.conv_general_dilated).

Every derivative must equal ``lax.conv_general_dilated``'s own, in float64: reverse mode,
forward mode and forward-over-reverse (the penalty's ``method="jvp"``), for the strides,
paddings and kernel sizes the model zoo uses, with the chunking forced on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gdreg.models import layers as conv_module
from gdreg.models.layers import conv_general_dilated, images_per_chunk

NHWC = ("NHWC", "HWIO", "NHWC")
# (kernel, stride, padding) as in the ResNet/VGG/DenseNet layers
LAYERS = [(3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0), (7, 2, 3)]


@pytest.fixture
def small_chunks(monkeypatch):
    # 8x8 outputs: 64 pixels per image, so a budget of 128 pixels gives chunks of 2 images.
    monkeypatch.setattr(conv_module, "CPU_CHUNK_PIXELS", 128)


def _problem(kernel, stride, seed=0):
    rng = np.random.default_rng(seed)
    size = 8 * stride
    x = jnp.asarray(rng.normal(size=(6, size, size, 3)))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)))
    return x, w


def _losses(stride, pad):
    def make(conv):
        def loss(x, w):
            y = conv(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=NHWC)
            return jnp.sum(jnp.tanh(y) * jnp.cos(y))

        return loss

    return make(conv_general_dilated), make(lax.conv_general_dilated)


@pytest.mark.parametrize("kernel,stride,pad", LAYERS)
def test_gradients_equal_xla(x64, small_chunks, kernel, stride, pad):
    x, w = _problem(kernel, stride)
    chunked, native = _losses(stride, pad)
    assert jax.default_backend() == "cpu"
    np.testing.assert_allclose(chunked(x, w), native(x, w), rtol=1e-14)
    got = jax.grad(chunked, argnums=(0, 1))(x, w)
    want = jax.grad(native, argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def _count_convolutions(jaxpr) -> int:
    return sum(eqn.primitive.name == "conv_general_dilated" for eqn in jaxpr.eqns)


def test_filter_gradient_is_split_into_chunks(x64, small_chunks):
    x, w = _problem(3, 1)  # 6 images of 8x8: chunks of 2 images
    chunked, native = _losses(1, 1)
    filter_grad = lambda loss: jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w).jaxpr  # noqa: E731
    # forward + one filter-gradient convolution, against forward + three chunks
    assert _count_convolutions(filter_grad(native)) == 2
    assert _count_convolutions(filter_grad(chunked)) == 4


@pytest.mark.parametrize("kernel,stride,pad", LAYERS[:3])
def test_forward_mode_and_hessian_vector_products_equal_xla(x64, small_chunks, kernel, stride, pad):
    x, w = _problem(kernel, stride)
    v = jnp.asarray(np.random.default_rng(1).normal(size=w.shape))
    u = jnp.asarray(np.random.default_rng(2).normal(size=x.shape))
    chunked, native = _losses(stride, pad)
    for argnum, tangent, primal in ((1, v, w), (0, u, x)):

        def along(f, argnum=argnum):
            return lambda p: f(*((p, w) if argnum == 0 else (x, p)))

        got = jax.jvp(along(chunked), (primal,), (tangent,))[1]
        want = jax.jvp(along(native), (primal,), (tangent,))[1]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # forward-over-reverse in the filter: H v, as gradient_norm_penalty(method="jvp") computes
    got = jax.jvp(jax.grad(chunked, argnums=1), (x, w), (jnp.zeros_like(x), v))[1]
    want = jax.jvp(jax.grad(native, argnums=1), (x, w), (jnp.zeros_like(x), v))[1]
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_vmap_over_blocks_equals_a_loop(x64, small_chunks):
    x, w = _problem(3, 1)
    blocks = jnp.stack([x, 2 * x])
    chunked, native = _losses(1, 1)
    got = jax.vmap(jax.grad(chunked, argnums=1), in_axes=(0, None))(blocks, w)
    want = jnp.stack([jax.grad(native, argnums=1)(block, w) for block in blocks])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_grouped_convolution_is_plain_xla(x64):
    x = jnp.ones((2, 4, 4, 4))
    w = jnp.ones((3, 3, 2, 4))
    args = ((1, 1), ((1, 1), (1, 1)))
    got = conv_general_dilated(x, w, *args, dimension_numbers=NHWC, feature_group_count=2)
    want = lax.conv_general_dilated(x, w, *args, dimension_numbers=NHWC, feature_group_count=2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "images,pixels,budget,expected",
    [
        (32, 1024, 8192, 8),  # CIFAR block of 32 at 32x32: four chunks of 8
        (128, 1024, 8192, 8),
        (32, 256, 8192, 32),  # 16x16: one chunk
        (30, 1024, 8192, 6),  # the largest divisor of 30 that fits
        (7, 1024, 8192, 7),  # a prime count that fits whole
        (7, 2048, 8192, 1),  # 7 does not split into chunks of 4
        (4, 100000, 8192, 1),  # an image larger than the budget: one image per chunk
    ],
)
def test_images_per_chunk(images, pixels, budget, expected):
    assert images_per_chunk(images, pixels, budget) == expected


def test_other_backends_get_xlas_own_convolution(x64, small_chunks, monkeypatch):
    monkeypatch.setattr(conv_module.jax, "default_backend", lambda: "gpu")
    x, w = _problem(3, 1)
    chunked, _ = _losses(1, 1)
    jaxpr = jax.make_jaxpr(jax.grad(chunked, argnums=1))(x, w).jaxpr
    assert _count_convolutions(jaxpr) == 2
