"""The sharded full-batch gradient against a naive per-block loop, across devices and processes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest
import two_processes
from jax.flatten_util import ravel_pytree

from gdreg import gradient_norm_penalty
from gdreg.engine.fullbatch import FullBatchGradient, block_layout
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.program import experiment

HERE = os.path.dirname(__file__)
PENALTY = gradient_norm_penalty(strength=0.5, learning_rate=0.1, eps=1e-2, method="forward")


def naive_full_batch(params, model_state, layout, penalty=None):
    """jax.grad per block, the penalty per block, the mean over blocks; no sharding at all."""
    images, labels = problems.dataset()
    grads, losses, accuracies, sq_norms, states = [], [], [], [], []
    penalty_state = penalty.init(params) if penalty else None
    for block in layout:
        x, y = images[block], labels[block]
        (loss, (state, aux)), g = jax.value_and_grad(problems.loss_fn, has_aux=True)(
            params, model_state, x, y
        )
        sq_norms.append(float(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(g))))
        if penalty is not None:
            g, _ = penalty.update(
                g,
                penalty_state,
                params,
                penalty_grad_fn=jax.grad(
                    lambda p, x=x, y=y: problems.loss_fn(p, model_state, x, y)[0]
                ),
            )
        grads.append(ravel_pytree(g)[0])
        losses.append(float(loss))
        accuracies.append(float(aux["accuracy"]))
        states.append(ravel_pytree(state)[0])
    # The "mean" rule: one momentum step (0.1) with the mean of the block statistics.
    old = ravel_pytree(model_state)[0]
    return {
        "grads": np.mean(grads, axis=0),
        "model_state": 0.9 * old + 0.1 * np.mean(states, axis=0),
        "loss": np.mean(losses),
        "accuracy": np.mean(accuracies),
        "block_grad_sq_norm": np.mean(sq_norms),
    }


def sharded_full_batch(params, model_state, layout, *, devices=None, penalty=None, **knobs):
    mesh = data_mesh(devices)
    knobs.setdefault("batchnorm_statistics", "mean")  # the rules: tests/test_batchnorm_statistics
    engine = FullBatchGradient(
        problems.loss_fn, problems.batch_fn, mesh=mesh, penalty=penalty, **knobs
    )
    result = engine(
        replicate(params, mesh),
        replicate(model_state, mesh),
        replicate(penalty.init(params), mesh) if penalty else None,
        replicate(problems.dataset(), mesh),
        layout,
        0,
    )
    return {
        "grads": ravel_pytree(fetch_replicated(result.grads))[0],
        "model_state": ravel_pytree(fetch_replicated(result.model_state))[0],
        "penalty_state": result.penalty_state,
        **fetch_replicated(result.metrics),
    }


@pytest.fixture(scope="module")
def setup():
    params, model_state = problems.init()
    layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)
    return params, model_state, layout


def assert_same(result, expected, rtol=2e-5, atol=1e-6):
    for key in ("grads", "model_state", "loss", "accuracy", "block_grad_sq_norm"):
        np.testing.assert_allclose(result[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("penalty", [None, PENALTY], ids=["plain", "penalty"])
def test_matches_naive_loop_over_blocks(setup, penalty):
    params, model_state, layout = setup
    expected = naive_full_batch(params, model_state, layout, penalty)
    result = sharded_full_batch(
        params, model_state, layout, devices=jax.devices()[:1], penalty=penalty
    )
    assert_same(result, expected)
    assert result["images"] == problems.NUM_IMAGES
    np.testing.assert_allclose(result["grad_norm"], np.linalg.norm(expected["grads"]), rtol=2e-5)
    if penalty is not None:
        assert int(fetch_replicated(result["penalty_state"]).count) == 1
        plain = naive_full_batch(params, model_state, layout)
        assert not np.allclose(plain["grads"], expected["grads"], rtol=1e-3), (
            "penalty had no effect"
        )


@pytest.mark.parametrize("penalty", [None, PENALTY], ids=["plain", "penalty"])
def test_one_device_equals_eight_devices(setup, penalty):
    assert jax.device_count() == 8, "tests/conftest.py asks XLA for 8 host devices"
    params, model_state, layout = setup
    one = sharded_full_batch(
        params, model_state, layout, devices=jax.devices()[:1], penalty=penalty
    )
    eight = sharded_full_batch(params, model_state, layout, penalty=penalty)
    assert_same(eight, one)
    assert eight["images"] == one["images"] == problems.NUM_IMAGES


@pytest.mark.parametrize(
    "knobs",
    [
        {"blocks_per_microbatch": 2},
        {"blocks_per_microbatch": 4},
        {"blocks_per_microbatch": 2, "block_loop": "vmap"},
        {"blocks_per_microbatch": 2, "microbatch_loop": "scan"},
    ],
    ids=lambda knobs: "-".join(f"{k}={v}" for k, v in knobs.items()),
)
def test_loop_knobs_do_not_change_the_result(setup, knobs):
    params, model_state, layout = setup
    devices = jax.devices()[:2]
    reference = sharded_full_batch(
        params, model_state, layout, devices=devices, penalty=PENALTY, blocks_per_microbatch=1
    )
    result = sharded_full_batch(
        params, model_state, layout, devices=devices, penalty=PENALTY, **knobs
    )
    assert_same(result, reference)


def test_blocks_not_dividing_devices_are_padded_with_zero_weight(setup):
    # 8 blocks on 3 devices x 2 blocks per microbatch: 4 zero-weight blocks pad the layout.
    params, model_state, layout = setup
    expected = naive_full_batch(params, model_state, layout)
    result = sharded_full_batch(
        params, model_state, layout, devices=jax.devices()[:3], blocks_per_microbatch=2
    )
    assert_same(result, expected)
    assert result["images"] == problems.NUM_IMAGES


def test_block_layout_drops_the_remainder_and_shuffles_by_seed():
    layout = block_layout(50, 8)
    assert layout.shape == (6, 8)
    np.testing.assert_array_equal(layout.ravel(), np.arange(48))
    shuffled = block_layout(50, 8, permutation_seed=3)
    assert shuffled.shape == (6, 8) and len(np.unique(shuffled)) == 48
    assert not np.array_equal(shuffled, layout)
    np.testing.assert_array_equal(shuffled, block_layout(50, 8, permutation_seed=3))
    assert not np.array_equal(shuffled, block_layout(50, 8, permutation_seed=4))
    with pytest.raises(ValueError, match="larger than the number of training images"):
        block_layout(5, 8)


def test_bad_knobs_are_rejected():
    mesh = data_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="microbatch_loop"):
        FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=mesh, microbatch_loop="x")
    with pytest.raises(ValueError, match="block_loop"):
        FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=mesh, block_loop="x")
    with pytest.raises(ValueError, match="blocks_per_microbatch"):
        FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=mesh, blocks_per_microbatch=0)


def test_two_processes_equal_one_process_with_four_devices(setup, tmp_path):
    params, model_state, layout = setup
    expected = sharded_full_batch(
        params, model_state, layout, devices=jax.devices()[:4], penalty=PENALTY
    )
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    two_processes.run_workers("fullbatch_worker.py", outs, timeout=240)
    for out in outs:
        got = np.load(out)
        np.testing.assert_allclose(got["grads"], expected["grads"], rtol=2e-5, atol=1e-6)
        for key in ("loss", "accuracy", "block_grad_sq_norm", "grad_norm"):
            np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, err_msg=key)


def test_step_flops_counts_every_block_once_on_any_device_count(setup):
    params, model_state, layout = setup
    counts = {}
    for devices, blocks in ((1, 4), (1, 8), (2, 8)):
        mesh = data_mesh(jax.devices()[:devices])
        engine = FullBatchGradient(problems.loss_fn, problems.batch_fn, mesh=mesh)
        counts[devices, blocks] = engine.step_flops(
            replicate(params, mesh),
            replicate(model_state, mesh),
            None,
            replicate(problems.dataset(), mesh),
            layout[:blocks],
        )
    assert counts[1, 4] > 0
    assert counts[1, 8] == pytest.approx(2 * counts[1, 4])
    # The count is taken before XLA partitions the step, where the cross-device sum of the
    # 2-device step costs a few operations more or less than 1 device's (16 of 847,456 here);
    # a block counted twice or missed would be off by 1/8.
    assert counts[2, 8] == pytest.approx(counts[1, 8], rel=1e-4)


def test_full_strength_hands_the_full_gradient_to_every_block(x64):
    """penalty_full_gradient: mean_B [g_B + lr/4 H_B (s g_B + f g)], g the plain mean gradient.

    Against explicit float64 Hessians of every block's loss, on 8 devices. The engine sums block
    gradients in float32 (see FullBatchResult), hence a tolerance of 1e-6 of the largest entry;
    the full-gradient term itself is far larger than that.
    """
    strength, full_strength, lr = 0.5, 2.0, 0.4
    params, model_state = problems.init()
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)
    images, labels = problems.dataset()
    images = images.astype(np.float64)
    flat, unravel = ravel_pytree(params)

    def block_loss(flat_params, block):
        inputs, targets = jnp.asarray(images)[block], jnp.asarray(labels)[block]
        return problems.loss_fn(unravel(flat_params), model_state, inputs, targets)[0]

    grad_of_block = jax.jit(jax.grad(block_loss))
    block_grads = [np.asarray(grad_of_block(flat, block)) for block in layout]
    full = np.mean(block_grads, axis=0)
    hessian_of_block = jax.jit(jax.hessian(block_loss))
    hessians = [np.asarray(hessian_of_block(flat, block)) for block in layout]

    def expected_with(weight):
        return np.mean(
            [
                g + lr / 4 * hessian @ (strength * g + weight * full)
                for g, hessian in zip(block_grads, hessians, strict=True)
            ],
            axis=0,
        )

    expected = expected_with(full_strength)
    tolerance = 1e-6 * np.abs(expected).max()
    assert np.abs(expected - expected_with(0.0)).max() > 100 * tolerance

    penalty = gradient_norm_penalty(
        strength=strength, learning_rate=lr, method="jvp", full_strength=full_strength
    )
    mesh = data_mesh()
    engine = FullBatchGradient(
        problems.loss_fn,
        problems.batch_fn,
        mesh=mesh,
        penalty=penalty,
        penalty_full_gradient=True,
    )
    result = engine(
        replicate(params, mesh),
        replicate(model_state, mesh),
        replicate(penalty.init(params), mesh),
        replicate((images, labels), mesh),
        layout,
        0,
    )
    grads = ravel_pytree(fetch_replicated(result.grads))[0]
    np.testing.assert_allclose(grads, expected, rtol=0, atol=tolerance)
    # Without the full gradient the same penalty cannot run: it says what it needs.
    with pytest.raises(ValueError, match="full_grads"):
        engine.replace(penalty_full_gradient=False)(
            replicate(params, mesh),
            replicate(model_state, mesh),
            replicate(penalty.init(params), mesh),
            replicate((images, labels), mesh),
            layout,
            0,
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_gradient_reads_the_one_normalized_block(dtype):
    """The first convolution's kernel gradient that the engine computes from the uint8 images
    (a full-batch call, and ``single_block`` as the SGD step calls it) equals, bitwise, the
    gradient of the loss at the block's normalized inputs computed beforehand and fed in as a
    constant: the forward pass and the kernel gradient read one input.

    (With the normalization computed as ``x * (1/255) - mean`` inside the step, XLA:CPU
    recomputed it for the kernel gradient apart from the forward pass, and FMA contraction made
    the two copies differ in the last bit: 115 of the 432 entries of a ResNet-18 stem's kernel
    gradient differed.)
    """
    with jax.enable_x64(dtype == "float64"):
        model = problems.register_tiny_batchnorm_model()
        config = problems.tiny_run_config()
        config.model.name = model
        config.model.dtype = dtype
        config.data.augmentation = "random"  # crops and flips too
        mesh = data_mesh(jax.devices()[:1])
        run = experiment.build(config, mesh=mesh)
        host = experiment.initial_state(run)
        as_dtype = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf, dtype), tree)  # noqa: E731
        params, model_state = as_dtype(host.params), as_dtype(host.model_state)
        engine = run.engine.replace(penalty=None)
        indices, step = np.arange(16, dtype=np.int32), 3

        inputs, labels = jax.jit(engine.batch_fn)(run.train_data, indices, step)
        assert inputs.dtype == dtype
        grad_at = jax.jit(jax.grad(engine.loss_fn, has_aux=True))
        expected = grad_at(params, model_state, np.asarray(inputs), np.asarray(labels))[0]

        full_batch = engine(
            replicate(params, mesh),
            replicate(model_state, mesh),
            None,
            run.train_data,
            indices[None],
            step,
        )
        single = jax.jit(engine.single_block)(
            params, model_state, None, run.train_data, jnp.asarray(indices), step
        )
    want = np.asarray(expected["Conv_0"]["kernel"])  # the convolution that reads the inputs
    assert want.dtype == dtype and np.abs(want).max() > 0
    for result in (full_batch, single):
        got = np.asarray(fetch_replicated(result.grads)["Conv_0"]["kernel"])
        np.testing.assert_array_equal(got, want)
