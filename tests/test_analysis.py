"""gdreg.program.analysis against naive per-block loops, and the engine's optional block moments.

Every metric of :func:`gdreg.program.analysis.analysis_metrics` is recomputed here block by block
with ``jax.grad`` on one device and numpy reductions in float64, for layouts on 1, 2, 3 and 8
devices, most of them padded with zero-weight blocks.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import problems
import pytest
from jax.flatten_util import ravel_pytree

from gdreg import gradient_norm_penalty
from gdreg.engine.directions import random_direction
from gdreg.engine.fullbatch import FullBatchGradient, block_layout
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.models import layers, registry
from gdreg.program import analysis, experiment
from gdreg.program import config as config_lib

MODEL_NAME = "analysis_tiny_bn"
EPOCH = 3  # the state after 3 epochs: the blocks and augmentation of epoch 3
NUM_IMAGES, BLOCK_SIZE = 40, 8  # 5 blocks: padded on 2, 3 and 8 devices


class TinyBatchNormNet(nn.Module):
    num_classes: int
    width: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.width, (3, 3), dtype=self.dtype)(jnp.asarray(x, self.dtype))
        x = layers.batch_norm(train, dtype=self.dtype)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def tiny_batchnorm_net(*, num_classes, width=None, dtype=jnp.float32):
    return TinyBatchNormNet(num_classes=num_classes, width=width or 4, dtype=dtype)


@pytest.fixture(scope="module")
def tiny_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
        registry.register_model(MODEL_NAME, tiny_batchnorm_net)
        yield MODEL_NAME


@pytest.fixture(scope="module")
def setup(tiny_model):
    """A run on 8 devices and a state with momentum and non-trivial running statistics."""
    config = problems.tiny_run_config()
    config.model.name = tiny_model
    config.data.synthetic_train_size = NUM_IMAGES
    config.train.block_size = BLOCK_SIZE
    config.analysis.every_epochs = 1
    run = experiment.build(config)
    host = experiment.initial_state(run)
    rng = np.random.default_rng(1)
    noise = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), host.params)
    _, opt_state = run.optimizer.tx.update(noise, host.opt_state, host.params)
    statistics = {
        "batch_stats": {
            layer: {
                "mean": 0.3 * rng.normal(size=v["mean"].shape).astype(np.float32),
                "var": (1 + rng.normal(size=v["var"].shape) ** 2).astype(np.float32),
            }
            for layer, v in host.model_state["batch_stats"].items()
        }
    }
    host = host._replace(
        epoch=np.asarray(EPOCH, np.int32),
        opt_state=jax.tree.map(np.asarray, opt_state),
        model_state=statistics,
    )
    return run, host


def on_devices(run, count, **knobs):
    """``run`` with its engine and training set on the first ``count`` devices."""
    mesh = data_mesh(jax.devices()[:count])
    host_data = {"images": run.dataset.train_images, "labels": run.dataset.train_labels}
    return dataclasses.replace(
        run,
        mesh=mesh,
        engine=run.engine.replace(mesh=mesh, **knobs),
        train_data=replicate(host_data, mesh),
    )


def block_inputs(run, layout, step):
    data = {"images": run.dataset.train_images, "labels": run.dataset.train_labels}
    batch = jax.jit(run.engine.batch_fn)
    return [batch(data, block, step) for block in layout]


def naive_metrics(run, host):
    """Every analysis metric but flatness, from a plain loop over blocks."""
    layout = run.epoch_layouts(EPOCH)[0]
    num_blocks, block_size = layout.shape
    assert num_blocks == NUM_IMAGES // BLOCK_SIZE

    @jax.jit
    def block_gradient(params, inputs, labels):
        return jax.grad(lambda p: run.engine.loss_fn(p, host.model_state, inputs, labels)[0])(
            params
        )

    grads = np.stack(
        [
            np.asarray(ravel_pytree(block_gradient(host.params, x, y))[0], np.float64)
            for x, y in block_inputs(run, layout, EPOCH)
        ]
    )
    mean = grads.mean(axis=0)
    std = grads.std(axis=0, ddof=1)
    block_norms = np.linalg.norm(grads, axis=1)
    traces = [
        s
        for s in jax.tree.leaves(host.opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
        if isinstance(s, optax.TraceState)
    ]
    assert len(traces) == 1
    n = num_blocks * block_size
    grad_sq = float(mean @ mean)
    # tr(Sigma) two ways: the estimator's formula and (K - 1) / K * ||sigma||^2 * N B / (N - B)
    trace = (num_blocks - 1) / num_blocks * float(std @ std) * n * block_size / (n - block_size)
    m = float(np.mean(block_norms**2))
    true_sq = (n * grad_sq - block_size * m) / (n - block_size)
    return {
        "analysis_param_norm": np.linalg.norm(ravel_pytree(host.params)[0]),
        "analysis_momentum_norm": np.linalg.norm(ravel_pytree(traces[0].trace)[0]),
        "analysis_grad_norm": np.linalg.norm(mean),
        "analysis_block_grad_norm_min": block_norms.min(),
        "analysis_block_grad_norm_mean": block_norms.mean(),
        "analysis_block_grad_norm_max": block_norms.max(),
        "analysis_grad_mean_mean": mean.mean(),
        "analysis_grad_std_norm": np.linalg.norm(std),
        "analysis_grad_std_mean": std.mean(),
        "analysis_grad_snr": np.linalg.norm(mean) / (np.linalg.norm(std) + 1e-10),
        "analysis_noise_trace": trace,
        "analysis_noise_grad_sq_norm": true_sq,
        "analysis_grad_noise_scale": trace / true_sq,
    }


@pytest.fixture(scope="module")
def expected(setup):
    return naive_metrics(*setup)


@pytest.mark.parametrize(
    ("devices", "knobs"),
    [
        (1, {}),
        (8, {}),  # 3 zero-weight blocks
        (3, {"blocks_per_microbatch": 2, "block_loop": "vmap"}),  # 1 zero-weight block
        (2, {"blocks_per_microbatch": 2, "microbatch_loop": "scan"}),  # 3 zero-weight blocks
    ],
    ids=["1-device", "8-devices", "3-devices-vmap", "2-devices-scan"],
)
def test_metrics_equal_a_naive_loop_over_blocks(setup, expected, devices, knobs):
    run, host = setup
    run = on_devices(run, devices, **knobs)
    state = replicate(host, run.mesh)
    got = analysis.analysis_metrics(run, state)
    assert sorted(got) == sorted(expected)  # flatness off
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-4, err_msg=key)
    # the spread is real: the SNR and the noise scale are neither 0 nor infinite here
    assert 0.05 < got["analysis_grad_snr"] < 20
    assert got["analysis_grad_noise_scale"] > 0


def test_flatness_walks_the_direction_until_the_evaluation_loss_exceeds_the_threshold(setup):
    run, host = setup
    run = on_devices(run, 8)
    step_size = 0.5
    layout = run.epoch_layouts(EPOCH)[0]
    inputs = block_inputs(run, layout, EPOCH)
    direction = random_direction(host.params, run.config.seed, EPOCH)
    direction_norm = np.linalg.norm(np.asarray(ravel_pytree(direction)[0], np.float64))
    assert direction_norm > 0

    @jax.jit
    def evaluation_loss(params, x, y):  # BatchNorm on the running statistics
        logits = run.model.apply({"params": params, **host.model_state}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def loss_at(k):
        params = jax.tree.map(
            lambda p, d: p + np.float32(k * step_size) * d, host.params, direction
        )
        return np.mean([float(evaluation_loss(params, x, y)) for x, y in inputs])

    losses = [loss_at(k) for k in range(12)]
    # a threshold first exceeded at step k_star > 0
    k_star = next(k for k in range(2, 12) if losses[k] > max(losses[:k]) + 1e-3)
    threshold = (max(losses[:k_star]) + losses[k_star]) / 2
    train_mode = analysis.make_gradient_engine(run.engine).forward_only()
    train_loss = fetch_replicated(
        train_mode(
            replicate(host.params, run.mesh),
            replicate(host.model_state, run.mesh),
            None,
            run.train_data,
            layout,
            EPOCH,
        ).metrics["loss"]
    )
    assert abs(train_loss - losses[0]) > 1e-3, "evaluation mode should differ from training mode"

    config = run.config
    config.analysis.flatness = True
    config.analysis.flatness_step_size = step_size
    config.analysis.flatness_threshold = float(threshold)
    config.analysis.flatness_max_steps = 20
    try:
        state = replicate(host, run.mesh)
        got = analysis.analysis_metrics(run, state)
        assert got["analysis_flatness_steps"] == k_star
        assert got["analysis_flatness_capped"] == 0
        np.testing.assert_allclose(got["analysis_flatness"], k_star * direction_norm, rtol=1e-6)
        np.testing.assert_allclose(
            got["analysis_flatness_distance"], step_size * k_star * direction_norm, rtol=1e-6
        )
        # never exceeded within the steps allowed: capped at flatness_max_steps
        config.analysis.flatness_threshold = 1e9
        config.analysis.flatness_max_steps = 2
        got = analysis.analysis_metrics(run, state)
        assert got["analysis_flatness_steps"] == 2 and got["analysis_flatness_capped"] == 1
        # above the threshold at the state itself: 0 steps, as in the reference
        config.analysis.flatness_threshold = float(losses[0]) / 2
        got = analysis.analysis_metrics(run, state)
        assert got["analysis_flatness_steps"] == 0 and got["analysis_flatness"] == 0
    finally:
        config.analysis.flatness = False


def test_momentum_is_found_by_name_and_absent_without_one():
    params = {"dense": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    grads = jax.tree.map(lambda p: np.full_like(p, 2.0), params)
    sgd = optax.sgd(0.1, momentum=0.9)
    _, state = sgd.update(grads, sgd.init(params), params)
    np.testing.assert_allclose(
        ravel_pytree(analysis.momentum_buffer(state, params))[0], np.full(9, 2.0)
    )
    adam = optax.adam(1e-3)
    _, state = adam.update(grads, adam.init(params), params)
    np.testing.assert_allclose(
        ravel_pytree(analysis.momentum_buffer(state, params))[0], np.full(9, 0.2), rtol=1e-6
    )
    plain = optax.sgd(0.1)
    assert analysis.momentum_buffer(plain.init(params), params) is None


def test_noise_scale_estimates_are_unbiased():
    """Blocks of B draws from N(G, Sigma) per example: the two estimates average to tr(Sigma)
    and |G|^2 (McCandlish et al. 2018, App. A.1), and the ratio is not far off."""
    rng = np.random.default_rng(0)
    dim, num_blocks, block_size, trials = 6, 4, 5, 20000
    true_mean = rng.normal(size=dim)
    scales = rng.uniform(0.5, 3.0, size=dim)  # Sigma = diag(scales^2)
    examples = true_mean + scales * rng.normal(size=(trials, num_blocks, block_size, dim))
    blocks = examples.mean(axis=2)
    m = np.mean(np.sum(blocks**2, axis=-1), axis=1)
    full = np.sum(blocks.mean(axis=1) ** 2, axis=-1)
    n = num_blocks * block_size
    estimates = [analysis.noise_scale(m[t], full[t], block_size, n) for t in range(trials)]
    trace = np.mean([e["noise_trace"] for e in estimates])
    true_sq = np.mean([e["noise_grad_sq_norm"] for e in estimates])
    np.testing.assert_allclose(trace, np.sum(scales**2), rtol=0.02)
    np.testing.assert_allclose(true_sq, true_mean @ true_mean, rtol=0.03)
    # one block (N = B) has no spread
    assert np.isnan(analysis.noise_scale(1.0, 1.0, 8, 8)["grad_noise_scale"])


# ----- the engine's block moments -----------------------------------------------------------


def _engine(devices, **knobs):
    mesh = data_mesh(jax.devices()[:devices])
    engine = FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=mesh, **knobs)
    params, model_state = problems.init()
    penalty = knobs.get("penalty")
    args = (
        replicate(params, mesh),
        replicate(model_state, mesh),
        replicate(penalty.init(params), mesh) if penalty else None,
        replicate(problems.dataset(), mesh),
    )
    return engine, args


def test_block_moments_skip_the_padding_blocks():
    # 8 blocks on 3 devices x 2 blocks per microbatch: 4 zero-weight blocks of image 0.
    layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)
    params, model_state = problems.init()
    images, labels = (jnp.asarray(a) for a in problems.dataset())

    @jax.jit
    def block_gradient(block):
        g = jax.grad(lambda p: problems.loss_fn(p, model_state, images[block], labels[block])[0])
        return ravel_pytree(g(params))[0]

    grads = np.stack([block_gradient(block) for block in layout]).astype(np.float64)
    real = np.sum(grads**2, axis=1)
    padding_gradient = np.asarray(block_gradient(np.zeros(problems.BLOCK_SIZE, np.int32)))
    padding = float(np.sum(padding_gradient.astype(np.float64) ** 2))
    assert not real.min() <= padding <= real.max(), "the padding block must stand out"
    for knobs in ({"block_loop": "vmap"}, {"microbatch_loop": "scan"}, {}):
        engine, args = _engine(3, blocks_per_microbatch=2, block_moments=True, **knobs)
        result = engine(*args, layout, 0)
        metrics = fetch_replicated(result.metrics)
        np.testing.assert_allclose(metrics["block_grad_sq_norm_min"], real.min(), rtol=1e-5)
        np.testing.assert_allclose(metrics["block_grad_sq_norm_max"], real.max(), rtol=1e-5)
        np.testing.assert_allclose(metrics["block_grad_norm"], np.sqrt(real).mean(), rtol=1e-5)
        np.testing.assert_allclose(
            ravel_pytree(fetch_replicated(result.block_grad_sq))[0],
            np.mean(grads**2, axis=0),
            rtol=1e-4,
            atol=1e-9,
        )


@pytest.mark.parametrize(
    "penalty",
    [None, gradient_norm_penalty(strength=0.5, learning_rate=0.1, eps=1e-2)],
    ids=["plain", "penalty"],
)
def test_block_moments_off_is_the_engine_as_before(penalty):
    """Off (the default), the compiled step is the same program; on, the engine's other
    results are unchanged bit for bit (one block per call, unrolled)."""
    layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)
    results, programs = [], []
    for extra in ({}, {"block_moments": False}, {"block_moments": True}):
        engine, args = _engine(3, penalty=penalty, **extra)
        result = engine(*args, layout, 0)
        results.append(fetch_replicated(result))
        carry, call_args, _ = engine._arguments(*args[:3], None, args[3], layout, 0)
        programs.append(engine._microbatch.lower(carry, *call_args, jnp.int32(0)).as_text())
    assert programs[0] == programs[1]
    assert programs[2] != programs[0]
    default, off, on = results
    assert off.block_grad_sq is None and default.block_grad_sq is None
    assert on.block_grad_sq is not None
    for other in (off, on):
        for a, b in zip(
            jax.tree.leaves((default.grads, default.model_state)),
            jax.tree.leaves((other.grads, other.model_state)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        for key, value in default.metrics.items():
            np.testing.assert_array_equal(other.metrics[key], value, err_msg=key)
    assert set(on.metrics) - set(default.metrics) == {
        "block_grad_norm",
        "block_grad_sq_norm_min",
        "block_grad_sq_norm_max",
    }


# ----- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("analysis.every_epochs", -1),
        ("analysis.flatness_step_size", 0.0),
        ("analysis.flatness_threshold", -1.0),
        ("analysis.flatness_max_steps", 0),
    ],
)
def test_bad_analysis_fields_are_named(field, value):
    config = config_lib.base_config()
    config_lib.set_field(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        experiment.validate(config)


def test_analysis_is_off_by_default_and_may_change_on_resume():
    saved = config_lib.base_config()
    assert saved.analysis.every_epochs == 0
    config = config_lib.base_config()
    config.analysis.every_epochs = 10
    config.analysis.flatness = True
    changes = config_lib.resume_changes(saved, config, allow=False)
    assert changes == {}


def test_analysis_metrics_have_their_own_tensorboard_group():
    from gdreg.program import summaries

    assert summaries.tag("analysis_grad_snr") == "analysis/grad_snr"
    assert summaries.tag("train_loss") == "loss/train"
