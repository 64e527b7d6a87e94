"""BatchNorm running statistics of a full-batch step against the reference's rule written out.

The reference implementation (fullbatch/training/training.py with PyTorch's BatchNorm2d)
updates the running statistics once per train-mode forward pass, one pass after another:
per block, the gradient pass at theta, then the penalty's passes at perturbed weights. The
expected values here come from that sequential loop, in float64, with the perturbed weights
computed from the penalty's definition (v = strength * g_B, step eps / ||v||), not from the
engine.
"""

from __future__ import annotations

import jax
import numpy as np
import problems
import pytest

from gdreg import gradient_norm_penalty
from gdreg.engine import objective
from gdreg.engine.fullbatch import FullBatchGradient, block_layout
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate

MOMENTUM = 0.1
EPS = 1e-2
STRENGTH = 0.5
# Loop shapes: (devices, blocks_per_microbatch, microbatch_loop, block_loop). 8 blocks of 6
# images; 3 blocks per microbatch on 2 devices and 2 on 8 devices leave zero-weight padding.
SHAPES = [
    (1, 1, "python", "unroll"),
    (2, 3, "python", "vmap"),
    (2, 2, "scan", "unroll"),
    (8, 2, "scan", "vmap"),
    (8, 1, "python", "unroll"),
]


def float64(tree):
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)


def problem():
    params, model_state = problems.init()
    # Start away from the initial 0/1 statistics, so the decay of the old state is visible.
    model_state = jax.tree.map(lambda leaf: leaf + 0.5, model_state)
    images, labels = problems.dataset()
    layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)
    return float64(params), float64(model_state), (images.astype(np.float64), labels), layout


def sequential_statistics(
    params, model_state, data, layout, *, method, strength, full_strength=0.0
):
    """running <- (1 - m) running + m s after every train-mode forward pass, in order."""
    images, labels = data
    running = model_state

    def update(running, statistics):
        return jax.tree.map(lambda r, s: (1 - MOMENTUM) * r + MOMENTUM * s, running, statistics)

    full = None
    if full_strength:  # the reference's first pass for acc_strength: every block at theta
        block_grads = []
        for block in layout:
            (_, (statistics, _)), grads = jax.value_and_grad(problems.loss_fn, has_aux=True)(
                params, model_state, images[block], labels[block]
            )
            running = update(running, statistics)
            block_grads.append(grads)
        full = jax.tree.map(lambda *leaves: np.mean(leaves, axis=0), *block_grads)
    for block in layout:
        x, y = images[block], labels[block]
        (_, (statistics, _)), grads = jax.value_and_grad(problems.loss_fn, has_aux=True)(
            params, model_state, x, y
        )
        running = update(running, statistics)
        if strength == 0 or method == "jvp":
            continue  # no forward pass at perturbed weights (the reference's double backprop)
        vector = jax.tree.map(lambda g: strength * np.asarray(g), grads)
        if full is not None:
            vector = jax.tree.map(lambda v, f: v + full_strength * f, vector, full)
        norm = np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(vector)))
        shifts = [1.0] if method == "forward" else [0.5, -0.5]  # central: theta + then theta -
        for shift in shifts:
            step = shift * EPS / norm
            at = jax.tree.map(lambda p, v, s=step: p + s * v, params, vector)
            running = update(running, problems.loss_fn(at, model_state, x, y)[1][0])
    return running


def engine_statistics(
    setup, shape, *, rule, method="forward", strength=STRENGTH, full_strength=0.0
):
    """The engine's running statistics after one step on ``setup`` (:func:`problem`)."""
    params, model_state, data, layout = setup
    devices, per_call, microbatch_loop, block_loop = shape
    mesh = data_mesh(jax.devices()[:devices])
    penalty = gradient_norm_penalty(
        strength=strength,
        learning_rate=0.1,
        eps=EPS,
        method=method,
        full_strength=full_strength,
    )
    engine = FullBatchGradient(
        problems.loss_fn,
        problems.batch_fn,
        mesh=mesh,
        penalty=penalty,
        penalty_full_gradient=full_strength > 0,
        blocks_per_microbatch=per_call,
        microbatch_loop=microbatch_loop,
        block_loop=block_loop,
        batchnorm_statistics=rule,
    )
    result = engine(
        replicate(params, mesh),
        replicate(model_state, mesh),
        replicate(penalty.init(params), mesh),
        replicate(data, mesh),
        layout,
        0,
    )
    return fetch_replicated(result.model_state)


def assert_trees_close(actual, expected, rtol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, e, rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_reference_rule_equals_the_sequential_loop_on_every_device_count_and_loop(x64, shape):
    params, model_state, data, layout = problem()
    expected = sequential_statistics(
        params, model_state, data, layout, method="forward", strength=STRENGTH
    )
    got = engine_statistics((params, model_state, data, layout), shape, rule="reference")
    assert_trees_close(got, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("method", "strength"), [("central", STRENGTH), ("jvp", STRENGTH), ("forward", 0.0)]
)
def test_reference_rule_counts_the_passes_each_penalty_makes(x64, method, strength):
    """central: 3 passes per block (theta, +, -); jvp and a zero strength: 1."""
    params, model_state, data, layout = problem()
    expected = sequential_statistics(
        params, model_state, data, layout, method=method, strength=strength
    )
    got = engine_statistics(
        (params, model_state, data, layout),
        (2, 3, "python", "vmap"),
        method=method,
        strength=strength,
        rule="reference",
    )
    assert_trees_close(got, expected, rtol=1e-12)
    # The forward rule's statistics differ: the count of passes matters.
    forward = sequential_statistics(
        params, model_state, data, layout, method="forward", strength=STRENGTH
    )
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(forward)[0], rtol=1e-6)


def test_reference_rule_puts_the_full_gradient_pass_first(x64):
    """penalty.full_strength > 0: the reference's first pass over all blocks (its acc_strength
    pre-pass) updates the statistics before the blocks' own passes."""
    params, model_state, data, layout = problem()
    expected = sequential_statistics(
        params, model_state, data, layout, method="forward", strength=STRENGTH, full_strength=0.3
    )
    got = engine_statistics(
        (params, model_state, data, layout), SHAPES[3], rule="reference", full_strength=0.3
    )
    assert_trees_close(got, expected, rtol=1e-12)


def test_mean_rule_is_one_momentum_step_with_the_mean_block_statistics(x64):
    params, model_state, data, layout = problem()
    images, labels = data
    block_statistics = [
        problems.loss_fn(params, model_state, images[block], labels[block])[1][0]
        for block in layout
    ]
    mean = jax.tree.map(lambda *leaves: np.mean(leaves, axis=0), *block_statistics)
    expected = jax.tree.map(lambda r, s: (1 - MOMENTUM) * r + MOMENTUM * s, model_state, mean)
    for shape in (SHAPES[0], SHAPES[3]):
        got = engine_statistics((params, model_state, data, layout), shape, rule="mean")
        assert_trees_close(got, expected, rtol=1e-12)


def test_block_statistics_are_the_mean_and_unbiased_variance(x64):
    """What the layer hands to the rules: PyTorch's running-statistics inputs."""
    params, model_state, data, layout = problem()
    images, labels = data
    x = images[layout[0]]
    statistics = problems.loss_fn(params, model_state, x, labels[layout[0]])[1][0]
    features = jax.lax.conv_general_dilated(
        x, params["Conv_0"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    flat = np.asarray(features).reshape(-1, features.shape[-1])
    bn = statistics["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(bn["mean"], flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn["var"], flat.var(0, ddof=1), rtol=1e-10)


def test_recompute_equals_one_train_mode_pass_over_the_whole_training_set(x64):
    """ResNet-18 (20 BatchNorm layers, 17 in a chain) at width 2: the statistics recomputed
    block by block on 8 devices equal those of one train-mode forward pass with the whole
    training set as a single batch."""
    from problems import tiny_run_config

    from gdreg.program import experiment

    config = tiny_run_config()
    config.model.name = "resnet18"
    config.model.width = 2
    config.model.dtype = "float64"
    config.data.augmentation = "none"
    config.data.synthetic_train_size = 64
    config.train.block_size = 16
    config.train.batchnorm_statistics = "recompute"
    run = experiment.build(config)
    host = experiment.initial_state(run)
    state = replicate(host._replace(model_state=float64(host.model_state)), run.mesh)
    got = experiment.recompute_statistics(run, state)

    layout = run.epoch_layouts(0)[0]
    inputs, labels = jax.jit(run.engine.batch_fn)(run.train_data, layout.reshape(-1), 0)
    loss_fn = objective.make_loss_fn(run.model)
    expected = loss_fn(host.params, float64(host.model_state), inputs, labels)[1][0]
    assert_trees_close(got, expected, rtol=1e-10)
    # Not the statistics of a block-wise train-mode pass (each block normalized by its own).
    first_block = loss_fn(host.params, host.model_state, inputs[:16], labels[:16])[1][0]
    var = jax.tree.leaves(first_block)[-1]
    assert not np.allclose(var, jax.tree.leaves(expected)[-1], rtol=1e-3)
