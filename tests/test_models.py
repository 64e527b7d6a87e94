"""Tests for gdreg.models: registry, shapes, exact parameter counts, BN, grads, mixed precision.

Everything that executes uses tiny widths and 8x8 inputs; full-size models are only
traced with jax.eval_shape (no parameters are materialised).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdreg.models import create_model, layers, model_names, register_model, registry
from gdreg.models.resnet import ShortcutC

BUILTIN = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "convnet1",
    "convnet2",
]
BN_MODELS = {n for n in BUILTIN if not n.startswith("convnet")}

# Tiny widths that keep every model cheap to run on a CPU.
TINY_WIDTH = {n: 2 for n in BUILTIN}
TINY_WIDTH.update({"resnet18": 4, "resnet34": 4, "convnet1": 4, "convnet2": 4})

# Trainable parameters at full width, 10 classes, 32x32x3 input. The BN models' counts do
# not depend on the input size; they equal the standard CIFAR figures (e.g. kuangliu's
# pytorch-cifar): shortcut "C" has exactly the parameters of a strided 1x1 conv + BN.
FULL_PARAM_COUNTS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "resnet101": 42_512_970,
    "resnet152": 58_156_618,
    "densenet121": 6_956_298,
    "vgg11": 9_231_114,
    "vgg13": 9_416_010,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
    # Small CNNs (input-size dependent because of the flatten), at 32x32x3:
    # 3*3*3*32+32 + 32*32*32*10+10 and 3*3*3*32+32 + 3*3*32*64+64 + 8*8*64*128+128 + 128*10+10.
    "convnet1": 328_586,
    "convnet2": 545_098,
}


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_init(model, shape=(2, 32, 32, 3)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)


def _abstract_apply(model, variables, shape, **kwargs):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, x)


def test_model_names_lists_builtins():
    names = model_names()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", BUILTIN)
def test_output_shapes(name, num_classes):
    model = create_model(name, num_classes=num_classes, width=TINY_WIDTH[name])
    variables = _abstract_init(model, (3, 8, 8, 3))
    for train in (False, True):
        out = _abstract_apply(model, variables, (3, 8, 8, 3), train=train, mutable=["batch_stats"])
        logits, state = out
        assert logits.shape == (3, num_classes)
        assert logits.dtype == jnp.float32
        assert ("batch_stats" in state) == (name in BN_MODELS)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("shape", [(2, 9, 9, 1), (2, 11, 13, 5), (2, 16, 16, 3)])
def test_any_spatial_size_and_channel_count(name, shape):
    """Odd sizes exercise the pooling / strided-conv size bookkeeping (residual sums)."""
    model = create_model(name, num_classes=7, width=TINY_WIDTH[name])
    variables = _abstract_init(model, shape)
    logits = _abstract_apply(model, variables, shape, train=False)
    assert logits.shape == (2, 7)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(FULL_PARAM_COUNTS))
def test_full_width_parameter_counts(name):
    model = create_model(name, num_classes=10)
    variables = _abstract_init(model)
    assert _count(variables["params"]) == FULL_PARAM_COUNTS[name]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_width_scales_resnet18():
    # Conv/BN parameters scale with width**2 / width; the head is 8w*10 + 10.
    model = create_model("resnet18", num_classes=10, width=16)
    params = _abstract_init(model)["params"]
    convs = FULL_PARAM_COUNTS["resnet18"] - (512 * 10 + 10)
    assert _count(params) - (128 * 10 + 10) < convs / 15
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stage4_block2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def _loss_fn(model, params, batch_stats, x, y):
    variables = {"params": params}
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    onehot = jax.nn.one_hot(y, logits.shape[-1])
    loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
    return loss, (logits, updates)


@pytest.mark.parametrize("name", BUILTIN)
def test_train_step_grads_and_batch_stats(name):
    model = create_model(name, num_classes=10, width=TINY_WIDTH[name])
    kx, ky, kinit = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (4, 8, 8, 3), jnp.float32) * 2.0 + 0.5
    y = jax.random.randint(ky, (4,), 0, 10)
    variables = model.init(kinit, x, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats")
    assert (batch_stats is not None) == (name in BN_MODELS)

    grad_fn = jax.jit(jax.value_and_grad(lambda p, bs: _loss_fn(model, p, bs, x, y), has_aux=True))
    (loss, (logits, updates)), grads = grad_fn(params, batch_stats)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0.0

    if name in BN_MODELS:
        new_stats = updates["batch_stats"]
        assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
        changed = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)),
            jax.tree.leaves(batch_stats),
            jax.tree.leaves(new_stats),
        )
        assert all(changed), "every BatchNorm's running statistics should move in train mode"
        # Eval mode uses running averages and needs nothing mutable.
        out_eval = model.apply({"params": params, "batch_stats": new_stats}, x, train=False)
        assert out_eval.shape == (4, 10)
        assert bool(jnp.all(jnp.isfinite(out_eval)))
    else:
        assert updates == {} or "batch_stats" not in updates
        # No BN: train and eval forward passes coincide.
        out_eval = model.apply({"params": params}, x, train=False)
        np.testing.assert_allclose(np.asarray(out_eval), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_batchnorm_running_stats_update_rule():
    """momentum 0.9 in Flax = PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch_mean."""
    model = create_model("resnet18", num_classes=10, width=4)
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) + 3.0
    variables = model.init(jax.random.key(1), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stem = updates["batch_stats"]["stem_bn"]
    conv_out = jax.lax.conv_general_dilated(
        x,
        variables["params"]["stem_conv"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    batch_mean = conv_out.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(stem["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stem["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)


@pytest.mark.parametrize("name", BUILTIN)
def test_bfloat16_compute_float32_params_and_logits(name):
    model = create_model(name, num_classes=10, width=TINY_WIDTH[name], dtype="bfloat16")
    variables = _abstract_init(model, (2, 8, 8, 3))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits, state = _abstract_apply(
        model,
        variables,
        (2, 8, 8, 3),
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    assert logits.dtype == jnp.float32
    inter = state["intermediates"]
    first_conv = next(k for k in ("stem_conv", "conv1") if k in inter)
    assert inter[first_conv]["__call__"][0].dtype == jnp.bfloat16
    if name in BN_MODELS:
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["batch_stats"]))
    # float32 default really computes in float32
    model32 = create_model(name, num_classes=10, width=TINY_WIDTH[name])
    _, state32 = _abstract_apply(
        model32, variables, (2, 8, 8, 3), train=False, capture_intermediates=True, mutable=True
    )
    assert state32["intermediates"][first_conv]["__call__"][0].dtype == jnp.float32


def test_bfloat16_runs():
    model = create_model("resnet18", num_classes=10, width=4, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    ref = create_model("resnet18", num_classes=10, width=4).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )[0]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.15, rtol=0.1)


def test_shortcut_c_structure():
    """Shortcut C appears exactly when a block changes shape. First bottleneck stage:
    channels change (w -> 4w) at stride 1, so there is a 1x1 conv + BN without pooling."""
    p18 = _abstract_init(create_model("resnet18", num_classes=10, width=8))["params"]
    assert "shortcut" not in p18["stage1_block1"]
    for stage in (2, 3, 4):
        assert set(p18[f"stage{stage}_block1"]["shortcut"]) == {"conv", "bn"}
        assert "shortcut" not in p18[f"stage{stage}_block2"]
    p50 = _abstract_init(create_model("resnet50", num_classes=10, width=8))["params"]
    assert p50["stage1_block1"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 8, 32)
    assert "bias" not in p50["stage1_block1"]["shortcut"]["conv"]
    assert "shortcut" not in p50["stage1_block2"]


@pytest.mark.parametrize(("stride", "size"), [(1, 4), (2, 4), (2, 5)])
def test_shortcut_c_numerics(stride, size):
    """avg-pool(stride) then 1x1 conv then BN; with an identity kernel and fresh BN in eval
    mode that is the pooled input / sqrt(1 + eps)."""
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    mod = ShortcutC(features=3, strides=stride)
    variables = mod.init(jax.random.key(1), x, train=False)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["conv"]["kernel"] = jnp.eye(3).reshape(1, 1, 3, 3)
    out = mod.apply({**variables, "params": params}, x, train=False)
    if stride == 1:
        expected = x
    else:
        xp = np.asarray(x)
        n = -(-size // stride)
        expected = np.stack(
            [
                np.stack(
                    [
                        xp[:, i * 2 : i * 2 + 2, j * 2 : j * 2 + 2].mean(axis=(1, 2))
                        for j in range(n)
                    ],
                    axis=1,
                )
                for i in range(n)
            ],
            axis=1,
        )
    np.testing.assert_allclose(out, expected / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)


def test_conv_padding_is_symmetric_like_pytorch():
    """A stride-2 3x3 conv pads 1 on every side (PyTorch padding=1), unlike Flax "SAME"."""
    conv = layers.conv(1, 3, strides=2, dtype=jnp.float32, kernel_init=jax.nn.initializers.ones)
    x = jnp.ones((1, 4, 4, 1))
    out = conv.apply(conv.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(out[0, :, :, 0], [[4.0, 6.0], [6.0, 9.0]])


def test_initialization():
    model = create_model("resnet18", num_classes=10, width=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    kernel = params["stage4_block2"]["conv2"]["kernel"]  # 3x3x128x128, fan_out = 9*128
    assert abs(float(jnp.std(kernel)) - math.sqrt(2.0 / (9 * 128))) < 0.002
    assert abs(float(jnp.mean(kernel))) < 0.002
    bn = params["stage4_block2"]["bn2"]
    assert bool(jnp.all(bn["scale"] == 1.0)) and bool(jnp.all(bn["bias"] == 0.0))
    fc = params["fc"]
    bound = 1.0 / math.sqrt(128)
    assert float(jnp.max(jnp.abs(fc["kernel"]))) <= bound
    assert float(jnp.max(jnp.abs(fc["bias"]))) <= bound
    assert float(jnp.max(jnp.abs(fc["bias"]))) > 0.0


def test_case_insensitive_names():
    model = create_model("ResNet18", num_classes=10, width=2)
    assert _abstract_init(model, (1, 8, 8, 3))["params"]["stem_conv"]["kernel"].shape[-1] == 2


def test_unknown_name_error():
    with pytest.raises(ValueError, match=r"model\.name") as info:
        create_model("resnet19", num_classes=10)
    assert "resnet18" in str(info.value) and "densenet121" in str(info.value)


@pytest.mark.parametrize("width", [0, -4, 2.5, True])
def test_bad_width_error(width):
    with pytest.raises(ValueError, match=r"model\.width"):
        create_model("resnet18", num_classes=10, width=width)


def test_bad_num_classes_and_dtype_errors():
    with pytest.raises(ValueError, match=r"model\.num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"model\.dtype"):
        create_model("resnet18", num_classes=10, dtype="int32")
    with pytest.raises(ValueError, match=r"model\.dtype"):
        create_model("resnet18", num_classes=10, dtype="not-a-dtype")


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    def factory(*, num_classes, width, dtype):
        seen.update(num_classes=num_classes, width=width, dtype=dtype)
        return create_model("convnet1", num_classes=num_classes, width=width or 3, dtype=dtype)

    register_model("my_net", factory)
    register_model("my_net", factory)  # same factory again: no-op
    assert "my_net" in model_names()
    model = create_model("my_net", num_classes=5, dtype="bfloat16")
    assert seen == {"num_classes": 5, "width": None, "dtype": jnp.dtype(jnp.bfloat16)}
    assert _abstract_apply(
        model, _abstract_init(model, (1, 8, 8, 3)), (1, 8, 8, 3), train=False
    ).shape == (1, 5)
    with pytest.raises(ValueError, match=r"model\.name"):
        register_model("my_net", lambda **kw: factory(**kw))
    register_model("my_net", lambda **kw: factory(**kw), overwrite=True)
    assert "resnet18" in model_names()
