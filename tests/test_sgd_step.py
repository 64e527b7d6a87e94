"""The data-parallel SGD step (gdreg.engine.train_step): one jitted step per minibatch, split over
devices.

Against a naive one-device loop (jax.value_and_grad on the whole minibatch, PyTorch's momentum
update of the BatchNorm statistics, the optax chain), on 1, 2 and 4 host devices; the work per
device (XLA's FLOP count) falls as 1/N; a minibatch that does not split is a config error.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from problems import register_tiny_batchnorm_model
from test_train import tiny_config

from gdreg.engine.mesh import data_mesh, replicate
from gdreg.engine.running_statistics import TORCH_MOMENTUM
from gdreg.program import experiment
from gdreg.program import loop as train
from gdreg.program.config import ConfigError

TINY_BATCHNORM = register_tiny_batchnorm_model()


def sgd_config(**overrides):
    """:func:`test_train.tiny_config` as an SGD run of the two-BatchNorm-layer model: 4
    minibatches of 32 per epoch, no warmup, no clipping, no penalty (``section__field``
    overrides as there)."""
    settings = {
        "model__name": TINY_BATCHNORM,
        "train__mode": "stochastic",
        "train__batch_size": 32,
        "train__epochs": 2,
        "optim__lr": 0.3,
        "optim__warmup_epochs": 0,
        "optim__cosine_epochs": 4,
        "optim__clip_norm": 0.0,
        "penalty__strength": 0.0,
    }
    return tiny_config(**{**settings, **overrides})


def build_on(config, devices):
    return experiment.build(config, mesh=data_mesh(jax.devices()[:devices]))


def train_epochs(run, epochs):
    state = replicate(experiment.initial_state(run), run.mesh)
    step = train.make_step(run)
    records = []
    for _ in range(epochs):
        state, record = train.run_epoch(run, state, step)
        records.append(record)
    return jax.tree.map(np.asarray, state), records


def naive_sgd(run, epochs):
    """One device, one minibatch at a time, every piece written out."""
    state = experiment.initial_state(run)
    params, model_state, opt_state = state.params, state.model_state, state.opt_state
    tx = run.optimizer.tx
    data = jax.tree.map(np.asarray, run.train_data)
    loss_fn, batch_fn = run.engine.loss_fn, run.engine.batch_fn

    @jax.jit
    def step(params, model_state, opt_state, indices, epoch):
        inputs, labels = batch_fn(data, indices, epoch)
        (loss, (statistics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, inputs, labels
        )
        model_state = jax.tree.map(
            lambda r, s: (1 - TORCH_MOMENTUM) * r + TORCH_MOMENTUM * s, model_state, statistics
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss

    losses = []
    for epoch in range(epochs):
        for layout in run.epoch_layouts(epoch):
            params, model_state, opt_state, loss = step(
                params, model_state, opt_state, layout[0], epoch
            )
            losses.append(float(loss))
    return params, model_state, losses


@pytest.fixture(scope="module")
def naive():
    run = build_on(sgd_config(), 1)
    return naive_sgd(run, 2)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_sgd_on_n_devices_follows_the_one_device_loop(naive, devices):
    params, model_state, losses = naive
    run = build_on(sgd_config(), devices)
    state, records = train_epochs(run, 2)
    # float32: the devices' partial sums change the summation order, nothing else.
    for got, want in ((state.params, params), (state.model_state, model_state)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), got, want)
    assert records[0]["train_loss"] == pytest.approx(np.mean(losses[:4]), rel=1e-5)
    assert records[1]["train_loss"] == pytest.approx(np.mean(losses[4:]), rel=1e-4)
    assert [r["images"] for r in records] == [128, 128]
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), model_state, state.model_state)
    assert model_state and jax.tree.leaves(moved)


def test_sgd_with_the_penalty_equals_its_one_device_run():
    """The penalty on each minibatch (jvp: exact, so float32 rounding is not amplified)."""
    config = sgd_config(penalty__strength=0.5, penalty__method="jvp")
    one, _ = train_epochs(build_on(config, 1), 1)
    four, _ = train_epochs(build_on(config, 4), 1)
    plain, _ = train_epochs(build_on(sgd_config(), 1), 1)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)  # noqa: E731
    jax.tree.map(close, four.params, one.params)
    assert (
        max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(plain.params), strict=True)
        )
        > 1e-4
    ), "the penalty should change the step"


def test_work_per_device_falls_as_one_over_the_devices():
    flops = {}
    for devices in (1, 8):
        run = build_on(sgd_config(train__batch_size=64), devices)
        state = replicate(experiment.initial_state(run), run.mesh)
        parts = (state.params, state.opt_state, state.model_state, state.penalty_state)
        flops[devices] = train.make_step(run).minibatch_flops(parts, run.train_data, 64)
    assert flops[1] and flops[8]
    assert flops[1] / flops[8] == pytest.approx(8, rel=0.15)


def test_a_minibatch_that_does_not_split_over_the_devices_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.batch_size 12 does not split evenly over the 8"):
        experiment.build(sgd_config(train__batch_size=12))


def test_a_diverging_step_is_not_applied():
    run = build_on(sgd_config(optim__lr=1e30), 2)
    state = replicate(experiment.initial_state(run), run.mesh)
    parts = (state.params, state.opt_state, state.model_state, state.penalty_state)
    order = np.concatenate(run.epoch_layouts(0))
    after, _, healthy, first_bad = train.make_step(run).stochastic_epoch(
        parts, run.train_data, order, 0, 0
    )
    assert not bool(healthy) and int(first_bad) >= 1
    # Every step from the first bad one on is skipped: the state is the last finite one.
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(after))
    with pytest.raises(train.TrainingDivergedError, match=r"non-finite .* \(step [1-9]"):
        train.run_epoch(run, state, train.make_step(run))
