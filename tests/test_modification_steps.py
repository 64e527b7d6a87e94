"""SAM and the Armijo line search in the training loop (gdreg.engine.train_step), against the pure
steps of gdreg.optim.sam driven by plain engine calls."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from test_sgd_step import build_on, sgd_config, train_epochs
from test_train import tiny_config

from gdreg.engine.mesh import fetch_replicated, replicate
from gdreg.optim import line_search, sam
from gdreg.program import experiment
from gdreg.program import loop as train
from gdreg.program.config import ConfigError


def first_step(run):
    host = experiment.initial_state(run)
    state = replicate(host, run.mesh)
    new_state, record = train.run_epoch(run, state, train.make_step(run))
    return host, state, jax.tree.map(np.asarray, new_state), record


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_full_batch_sam_steps_with_the_gradient_at_the_ascent_point():
    config = tiny_config(optim__modification="sam", optim__sam_rho=0.05, optim__warmup_epochs=0)
    run = experiment.build(config)
    _, state, after, record = first_step(run)
    layout = run.epoch_layouts(0)[0]

    def gradient_fn(params):
        result = run.engine(
            params, state.model_state, state.penalty_state, run.train_data, layout, 0
        )
        return result.grads, result

    grads, _ = sam.sam_gradient(gradient_fn, state.params, 0.05, has_aux=True)
    at_params = gradient_fn(state.params)[1]
    updates, _ = run.optimizer.tx.update(grads, state.opt_state, state.params)
    expected = fetch_replicated(optax.apply_updates(state.params, updates))
    jax.tree.map(close, after.params, expected)
    # The loss is reported at the parameters, not at the ascent point.
    assert record["train_loss"] == pytest.approx(float(at_params.metrics["loss"]), rel=1e-6)
    plain = experiment.build(tiny_config(optim__warmup_epochs=0))
    differs = jax.tree.map(
        lambda a, b: np.abs(a - b).max(), first_step(plain)[2].params, after.params
    )
    assert max(jax.tree.leaves(differs)) > 1e-6


def test_stochastic_sam_is_data_parallel():
    """SAM on every minibatch, split over 2 devices, equals its one-device run (whether it is
    SAM at all is checked on the full-batch step above: the same _perturbed and the same
    bookkeeping)."""
    config = sgd_config(optim__modification="sam", optim__sam_rho=0.1)
    one, _ = train_epochs(build_on(config, 1), 1)
    two, records = train_epochs(build_on(config, 2), 1)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), two.params, one.params
    )
    assert np.isfinite(records[0]["train_loss"])


def test_armijo_line_search_takes_the_step_the_pure_search_takes():
    config = tiny_config(optim__line_search="armijo", optim__warmup_epochs=0, optim__lr=50.0)
    run = experiment.build(config)
    _, state, after, record = first_step(run)
    layout = run.epoch_layouts(0)[0]
    result = run.engine(
        state.params, state.model_state, state.penalty_state, run.train_data, layout, 0
    )
    forward = run.engine.forward_only()
    updates, _ = run.optimizer.tx.update(result.grads, state.opt_state, state.params)

    def loss_fn(params):
        evaluation = forward(params, state.model_state, None, run.train_data, layout, 0)
        return float(fetch_replicated(evaluation.metrics["loss"]))

    search = line_search.armijo_step(
        loss_fn, state.params, updates, result.grads, settings=run.optimizer.line_search
    )
    assert 0 < search.step_size < 1, "lr 50 should need backtracking"
    assert record["line_search_step"] == search.step_size
    jax.tree.map(close, after.params, fetch_replicated(search.params))


def test_line_search_with_stochastic_epochs_is_a_config_error():
    config = tiny_config(
        optim__line_search="armijo", train__mode="stochastic", train__batch_size=32
    )
    with pytest.raises(ConfigError, match=r"optim\.line_search"):
        experiment.build(config)
