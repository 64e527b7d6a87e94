"""Tests for gdreg.models: registry, shapes, exact parameter counts, BN, grads, mixed precision.

Cost notes (2 CPU cores): tracing a Flax model costs ~5 ms per layer and XLA:CPU compiles
of deep forward+backward graphs take tens of seconds at the default optimization level. So:

* full-size models are only traced (``jax.eval_shape``), never materialised, and the
  abstract variables are cached per (model, classes, width, input shape);
* everything that executes is jitted once and compiled with XLA's backend optimization
  level 0 and without the CPU fusion emitters, which compiles several times faster; inputs
  are numpy arrays and checks run in numpy (each eager JAX op would compile);
* forward+backward *execution* runs by default on resnet18, vgg11 and the small CNNs
  (registered models, full depth, tiny width) and on reduced-depth instances of the
  bottleneck ResNet and DenseNet classes (same code as resnet50/101/152 and densenet121,
  fewer repeats). Set ``GDREG_SLOW_MODEL_TESTS=1`` to also execute a train step of every
  registered model at full depth (marked ``slow``; a few minutes on 2 cores).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdreg.models import create_model, layers, model_names, register_model, registry
from gdreg.models.densenet import DenseNet
from gdreg.models.resnet import Bottleneck, ResNet, ShortcutC

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
    # (3*3*3*32 + 32) + (32*32*32*10 + 10), and
    # (3*3*3*32 + 32) + (3*3*32*64 + 64) + (8*8*64*128 + 128) + (128*10 + 10).
    "convnet1": 328_586,
    "convnet2": 545_098,
}
# Width of the features entering the classifier at full width (for the 100-class count).
HEAD_IN = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "densenet121": 1024,
    "vgg11": 512,
    "vgg13": 512,
    "vgg16": 512,
    "vgg19": 512,
    "convnet1": 32 * 32 * 32,
    "convnet2": 128,
}

# XLA:CPU options for the executed tests: no backend optimization and the classic (non
# "fusion emitter") code generator; together several times faster to compile than the
# defaults for these conv nets, at a run time that does not matter for tiny inputs.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _reduced_bottleneck_resnet(num_classes=10, width=2, dtype=jnp.float32):
    return ResNet(
        stage_sizes=(2, 1, 1, 1),
        block_cls=Bottleneck,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
    )


def _reduced_densenet(num_classes=10, width=4, dtype=jnp.float32):
    return DenseNet(block_config=(2, 1, 2, 1), num_classes=num_classes, growth=width, dtype=dtype)


# Models that *execute* in the default run: name -> constructor(num_classes, dtype).
EXECUTED = {
    "resnet18": lambda c, dt=jnp.float32: create_model(
        "resnet18", num_classes=c, width=4, dtype=dt
    ),
    "resnet_bottleneck_reduced": lambda c, dt=jnp.float32: _reduced_bottleneck_resnet(c, 2, dt),
    "densenet_reduced": lambda c, dt=jnp.float32: _reduced_densenet(c, 4, dt),
    "vgg11": lambda c, dt=jnp.float32: create_model("vgg11", num_classes=c, width=4, dtype=dt),
    "convnet1": lambda c, dt=jnp.float32: create_model(
        "convnet1", num_classes=c, width=4, dtype=dt
    ),
    "convnet2": lambda c, dt=jnp.float32: create_model(
        "convnet2", num_classes=c, width=4, dtype=dt
    ),
}
EXEC_SHAPE = (4, 8, 8, 3)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _run(fn, *args):
    """Compile ``fn`` for ``args`` with the fast-compile options ``FAST``, run it
    and return the result as numpy arrays. Inputs are numpy arrays and random keys are made
    inside ``fn``: eager JAX ops (random numbers, checks on results) would each compile."""
    return jax.device_get(jax.jit(fn).lower(*args).compile(FAST)(*args))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _abstract_init(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _abstract_apply(model, variables, shape, **kwargs):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, x)


@functools.cache
def _variables(name, num_classes, width, shape):
    """Abstract (shape-only) variables of a registered float32 model, traced once."""
    return _abstract_init(create_model(name, num_classes=num_classes, width=width), shape)


def test_model_names_lists_builtins():
    names = model_names()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)


@pytest.mark.parametrize("name", BUILTIN)
def test_full_width_parameter_count_and_shape(name):
    """Exact trainable-parameter counts at full width (10 classes), float32 variables, and
    the train-mode output / batch_stats, all from shape-only tracing."""
    variables = _variables(name, 10, None, (2, 32, 32, 3))
    assert _count(variables["params"]) == FULL_PARAM_COUNTS[name]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    assert ("batch_stats" in variables) == (name in BN_MODELS)
    model = create_model(name, num_classes=10)
    logits, state = _abstract_apply(
        model, variables, (2, 32, 32, 3), train=True, mutable=["batch_stats"]
    )
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    if name in BN_MODELS:
        assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )
    else:
        assert "batch_stats" not in state


@pytest.mark.parametrize("name", BUILTIN)
def test_100_classes_tiny_width_8x8(name):
    variables = _variables(name, 100, TINY_WIDTH[name], (3, 8, 8, 3))
    model = create_model(name, num_classes=100, width=TINY_WIDTH[name])
    logits, state = _abstract_apply(
        model, variables, (3, 8, 8, 3), train=False, capture_intermediates=True, mutable=True
    )
    assert logits.shape == (3, 100) and logits.dtype == jnp.float32
    # The float32 default computes in float32 (see the bfloat16 test for the switch).
    inter = state["intermediates"]
    first_conv = "stem_conv" if "stem_conv" in inter else "conv1"
    assert inter[first_conv]["__call__"][0].dtype == jnp.float32
    head = max(
        (x for x in jax.tree.leaves(variables["params"]) if x.ndim == 2), key=lambda x: x.shape[1]
    )
    assert head.shape[1] == 100


def test_100_class_full_width_count_differs_by_head_only():
    for name in ("resnet18", "resnet50", "vgg16", "convnet2"):
        params = _variables(name, 100, None, (2, 32, 32, 3))["params"]
        assert _count(params) == FULL_PARAM_COUNTS[name] + 90 * (HEAD_IN[name] + 1)


@pytest.mark.parametrize("name", BUILTIN)
def test_bfloat16_compute_float32_params_and_logits(name):
    """dtype="bfloat16": every layer computes in bf16 (captured intermediates), BN
    statistics stay float32, logits come back float32 (float32 parameters: see
    test_eval_mode_and_bfloat16_close_to_float32)."""
    shape = (3, 8, 8, 3)
    width = TINY_WIDTH[name]
    variables = _variables(name, 100, width, shape)
    model = create_model(name, num_classes=100, width=width, dtype="bfloat16")
    logits, state = _abstract_apply(
        model,
        variables,
        shape,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    assert logits.dtype == jnp.float32
    inter = state["intermediates"]
    first_conv = "stem_conv" if "stem_conv" in inter else "conv1"
    assert inter[first_conv]["__call__"][0].dtype == jnp.bfloat16
    # Every submodule (conv, BN, dense, block) computes in bfloat16; only the model's own
    # output (the top-level "__call__") is cast back to float32.
    sub = {k: v for k, v in inter.items() if k != "__call__"}
    assert sub and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(sub))
    if name in BN_MODELS:
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["batch_stats"]))


@pytest.mark.parametrize("name", sorted(EXECUTED))
@pytest.mark.parametrize("shape", [(2, 9, 9, 1), (2, 11, 13, 5), (2, 16, 16, 3)])
def test_any_spatial_size_and_channel_count(name, shape):
    """Odd sizes exercise the pooling / strided-conv size bookkeeping (residual sums)."""
    model = EXECUTED[name](7)
    variables = _abstract_init(model, shape)
    logits = _abstract_apply(model, variables, shape, train=False)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def _batch(seed=1):
    rng = _rng(seed)
    x = (rng.standard_normal(EXEC_SHAPE) * 2.0 + 0.5).astype(np.float32)
    y = rng.integers(0, 10, size=EXEC_SHAPE[:1]).astype(np.int32)
    return x, y


def _init_variables(model):
    x, _ = _batch()
    return _run(lambda x: model.init(jax.random.key(0), x, train=False), x)


@functools.cache
def _executed_variables(name):
    """Concrete (numpy) variables of an executed model with 10 classes, initialised once."""
    return _init_variables(EXECUTED[name](10))


def _train_step_check(model, variables, has_bn):
    """One jitted forward/backward in train mode: finite float32 grads, BN statistics move."""
    x, y = _batch()

    def step(variables, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
            return loss, (logits, updates)

        return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])

    (loss, (logits, updates)), grads = _run(step, variables, x, y)
    params = variables["params"]
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0.0
    if has_bn:
        old, new = variables["batch_stats"], updates["batch_stats"]
        assert jax.tree.structure(new) == jax.tree.structure(old)
        moved = [
            bool(np.any(a != b))
            for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
        ]
        assert all(moved), "every BatchNorm's running statistics should move in train mode"
    else:
        assert "batch_stats" not in variables and "batch_stats" not in updates


@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_train_step_grads_and_batch_stats(name):
    _train_step_check(
        EXECUTED[name](10), _executed_variables(name), has_bn=not name.startswith("convnet")
    )


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GDREG_SLOW_MODEL_TESTS") != "1",
    reason="full-depth train step of every model: set GDREG_SLOW_MODEL_TESTS=1",
)
@pytest.mark.parametrize("name", BUILTIN)
def test_train_step_every_registered_model(name):
    model = create_model(name, num_classes=10, width=TINY_WIDTH[name])
    _train_step_check(model, _init_variables(model), has_bn=name in BN_MODELS)


def test_eval_mode_and_bfloat16_close_to_float32():
    """Eval mode runs without mutable collections (running averages); a bfloat16 model
    applied to the same float32 variables gives float32 logits close to float32 compute."""
    x, _ = _batch()
    m16 = EXECUTED["resnet18"](10, jnp.bfloat16)
    m32 = EXECUTED["resnet18"](10)
    variables = _executed_variables("resnet18")
    abstract16 = _abstract_init(m16, EXEC_SHAPE)  # bfloat16 model: float32 parameters
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract16) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables
    )

    def run(variables, x):
        return m16.apply(variables, x, train=False), m32.apply(variables, x, train=False)

    out16, out32 = _run(run, variables, x)
    assert out16.dtype == jnp.float32 and out32.dtype == jnp.float32
    assert np.isfinite(out16).all()
    rel = float(np.linalg.norm(out16 - out32) / np.linalg.norm(out32))
    assert 0.0 < rel < 0.1


def test_batchnorm_reports_batch_statistics():
    """Train mode stores the batch mean and unbiased variance (the running averages are the
    engine's, gdreg.engine.running_statistics); the normalization itself uses the batch mean and
    biased variance with eps 1e-5, as PyTorch's."""
    bn = layers.batch_norm(True, dtype=jnp.float32)
    x = (_rng().standard_normal((6, 3, 3, 4)) * 3.0 + 2.0).astype(np.float32)

    def run(x):
        variables = bn.init(jax.random.key(1), x)
        return bn.apply(variables, x, mutable=["batch_stats"])

    y, updates = _run(run, x)
    xn = x.reshape(-1, 4)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], xn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], xn.var(0, ddof=1), rtol=1e-5)
    expected = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
    np.testing.assert_allclose(y.reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)


def test_shortcut_c_structure():
    """Shortcut C appears exactly when a block changes shape. First bottleneck stage:
    channels change (64 -> 256) at stride 1, so there is a 1x1 conv + BN without pooling."""
    p18 = _variables("resnet18", 10, None, (2, 32, 32, 3))["params"]
    assert "shortcut" not in p18["stage1_block1"]
    for stage in (2, 3, 4):
        assert set(p18[f"stage{stage}_block1"]["shortcut"]) == {"conv", "bn"}
        assert "shortcut" not in p18[f"stage{stage}_block2"]
    assert p18["stage2_block1"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 128)
    p50 = _variables("resnet50", 10, None, (2, 32, 32, 3))["params"]
    assert p50["stage1_block1"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 256)
    assert "bias" not in p50["stage1_block1"]["shortcut"]["conv"]
    assert "shortcut" not in p50["stage1_block2"]
    assert p50["stage2_block1"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 256, 512)


def test_shortcut_c_numerics():
    """avg-pool(stride) then 1x1 conv then BN; with an identity kernel and fresh BN in eval
    mode that is the pooled input / sqrt(1 + eps). Odd sizes keep the partial window."""
    cases = [(1, 4), (2, 4), (2, 5)]
    xs = [
        _rng(i).standard_normal((2, s, s, 3)).astype(np.float32) for i, (_, s) in enumerate(cases)
    ]

    def run(xs):
        outs = []
        for (stride, _), x in zip(cases, xs, strict=True):
            mod = ShortcutC(features=3, strides=stride)
            variables = mod.init(jax.random.key(1), x, train=False)
            params = {**variables["params"], "conv": {"kernel": jnp.eye(3).reshape(1, 1, 3, 3)}}
            outs.append(mod.apply({**variables, "params": params}, x, train=False))
        return outs

    for (stride, size), x, out in zip(cases, xs, _run(run, xs), strict=True):
        n = -(-size // stride)
        expected = np.zeros((2, n, n, 3), np.float32)
        for i in range(n):
            for j in range(n):
                window = x[:, i * stride : (i + 1) * stride, j * stride : (j + 1) * stride]
                expected[:, i, j] = window.mean(axis=(1, 2))
        np.testing.assert_allclose(out, expected / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)


def test_conv_padding_is_symmetric_like_pytorch():
    """A stride-2 3x3 conv pads 1 on every side (PyTorch padding=1), unlike Flax "SAME"."""
    conv = layers.conv(1, 3, strides=2, dtype=jnp.float32, kernel_init=jax.nn.initializers.ones)
    x = np.ones((1, 4, 4, 1), np.float32)
    out = _run(lambda x: conv.apply(conv.init(jax.random.key(0), x), x), x)
    np.testing.assert_allclose(out[0, :, :, 0], [[4.0, 6.0], [6.0, 9.0]])


def _std_ratio(kernel, expected_std):
    return float(np.std(kernel)) / expected_std


def test_initialization_resnet():
    params = _executed_variables("resnet18")["params"]
    kernel = params["stage4_block2"]["conv2"]["kernel"]  # 3x3x32x32, Kaiming fan_out 9*32
    assert kernel.shape == (3, 3, 32, 32)
    assert abs(_std_ratio(kernel, math.sqrt(2.0 / (9 * 32))) - 1.0) < 0.05
    assert abs(float(np.mean(kernel))) < 0.01
    assert "bias" not in params["stage4_block2"]["conv2"]
    bn = params["stage4_block2"]["bn2"]
    assert np.all(bn["scale"] == 1.0) and np.all(bn["bias"] == 0.0)
    fc = params["fc"]  # PyTorch nn.Linear default: U(-1/sqrt(32), 1/sqrt(32)) for both
    bound = 1.0 / math.sqrt(32)
    assert float(np.max(np.abs(fc["kernel"]))) <= bound
    assert float(np.max(np.abs(fc["bias"]))) <= bound
    assert float(np.max(np.abs(fc["bias"]))) > 0.3 * bound


def test_initialization_vgg_and_densenet():
    vgg = _executed_variables("vgg11")["params"]
    k = vgg["conv8"]["kernel"]  # 3x3x32x32, Kaiming fan_out
    assert k.shape == (3, 3, 32, 32)
    assert abs(_std_ratio(k, math.sqrt(2.0 / (9 * 32))) - 1.0) < 0.05
    assert np.all(vgg["conv8"]["bias"] == 0.0)
    assert abs(_std_ratio(vgg["classifier"]["kernel"], 0.01) - 1.0) < 0.25
    assert np.all(vgg["classifier"]["bias"] == 0.0)
    dense = _executed_variables("densenet_reduced")["params"]
    k = dense["block3_layer2"]["conv2"]["kernel"]  # 3x3x16x4: fan_in 144 (fan_out would be 36)
    assert k.shape == (3, 3, 16, 4)
    assert abs(_std_ratio(k, math.sqrt(2.0 / (9 * 16))) - 1.0) < 0.2
    assert np.all(dense["classifier"]["bias"] == 0.0)


def test_case_insensitive_names():
    model = create_model("ResNet18", num_classes=10, width=2)
    assert _abstract_init(model, (1, 8, 8, 3))["params"]["stem_conv"]["kernel"].shape[-1] == 2


def test_unknown_name_error():
    with pytest.raises(ValueError, match=r"^name: unknown model 'resnet19'") as info:
        create_model("resnet19", num_classes=10)
    assert "resnet18" in str(info.value) and "densenet121" in str(info.value)


@pytest.mark.parametrize("width", [0, -4, 2.5, True])
def test_bad_width_error(width):
    with pytest.raises(ValueError, match=r"^width must be a positive integer"):
        create_model("resnet18", num_classes=10, width=width)


def test_numpy_integers_accepted():
    model = create_model("convnet1", num_classes=np.int64(3), width=np.int32(2))
    assert model.num_classes == 3 and type(model.num_classes) is int and model.width == 2


def test_bad_num_classes_and_dtype_errors():
    with pytest.raises(ValueError, match=r"^num_classes must be a positive integer"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"^dtype must be one of .*, got int32"):
        create_model("resnet18", num_classes=10, dtype="int32")
    for low in ("float8_e4m3fn", "float4_e2m1fn"):  # they do not learn without scaling
        with pytest.raises(ValueError, match=rf"^dtype must be one of .*, got {low}"):
            create_model("resnet18", num_classes=10, dtype=low)
    # float64 computes in float32 unless JAX's 64-bit mode is on
    with jax.enable_x64(False), pytest.raises(ValueError, match="needs JAX's 64-bit mode"):
        create_model("resnet18", num_classes=10, dtype="float64")
    with jax.enable_x64(True):
        assert create_model("convnet1", num_classes=3, dtype="float64").dtype == jnp.float64
    with pytest.raises(ValueError, match=r"^dtype: unknown dtype"):
        create_model("resnet18", num_classes=10, dtype="not-a-dtype")


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    def factory(*, num_classes, width, dtype):
        seen.update(num_classes=num_classes, width=width, dtype=dtype)
        return create_model("convnet1", num_classes=num_classes, width=width or 3, dtype=dtype)

    register_model("my_net", factory)
    register_model("my_net", factory)  # the same factory again: a no-op
    assert "my_net" in model_names()
    model = create_model("My_Net", num_classes=5, dtype="bfloat16")
    assert seen == {"num_classes": 5, "width": None, "dtype": jnp.dtype(jnp.bfloat16)}
    variables = _abstract_init(model, (1, 8, 8, 3))
    assert _abstract_apply(model, variables, (1, 8, 8, 3), train=False).shape == (1, 5)
    with pytest.raises(ValueError, match=r"^name 'my_net' is already registered"):
        register_model("my_net", lambda **kw: factory(**kw))
    register_model("my_net", lambda **kw: factory(**kw), overwrite=True)
    assert "resnet18" in model_names()


@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_one_full_batch_step_with_the_penalty(name):
    """Each model family through the real engine: two blocks, forward-difference penalty."""
    from gdreg import gradient_norm_penalty
    from gdreg.engine.fullbatch import FullBatchGradient, block_layout
    from gdreg.engine.mesh import data_mesh, fetch_replicated
    from gdreg.engine.objective import make_loss_fn

    model = EXECUTED[name](10)
    variables = _executed_variables(name)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    penalty = gradient_norm_penalty(strength=0.5, learning_rate=0.1)
    engine = FullBatchGradient(
        make_loss_fn(model),
        lambda data, indices, step: (data[0][indices], data[1][indices]),
        mesh=data_mesh(jax.devices()[:1]),
        penalty=penalty,
        blocks_per_microbatch=2,
    )
    x, y = _batch()
    result = engine(params, model_state, penalty.init(params), (x, y), block_layout(len(x), 2), 0)
    grads = fetch_replicated(result.grads)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.isfinite(float(fetch_replicated(result.metrics["loss"])))
    if not name.startswith("convnet"):
        old, new = model_state["batch_stats"], fetch_replicated(result.model_state)["batch_stats"]
        assert all(
            np.any(a != b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
        )
