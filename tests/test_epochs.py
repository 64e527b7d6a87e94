"""The run's epoch plan (gdreg.program.epochs) and the loop options around it: the SGD <->
full-batch switch, sampling with replacement, the semi-stochastic check, stopping at 100% training
accuracy, and the moving average of the weights (eval.ema)."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import killed_and_resumed, strip_timing, tiny_config

from gdreg.program import experiment, rundir
from gdreg.program import loop as train
from gdreg.program.config import ConfigError
from gdreg.program.epochs import EpochPlan


def restore(workdir, epoch):
    path = os.path.join(os.path.abspath(workdir), rundir.CHECKPOINT_DIR)
    with ocp.CheckpointManager(path) as manager:
        return jax.tree.map(np.asarray, manager.restore(epoch, args=ocp.args.StandardRestore()))


def test_the_plan_counts_steps_across_a_switch():
    plan = EpochPlan(mode="stochastic", switch_after=2, steps={"stochastic": 4, "fullbatch": 1})
    assert [plan.mode_of(e) for e in range(4)] == ["stochastic"] * 2 + ["fullbatch"] * 2
    assert [plan.first_step(e) for e in range(5)] == [0, 4, 8, 9, 10]
    steps = np.arange(11)
    np.testing.assert_array_equal(plan.epoch_of_step(steps), [0] * 4 + [1] * 4 + [2, 3, 4])
    back = EpochPlan(mode="fullbatch", switch_after=1, steps={"stochastic": 3, "fullbatch": 1})
    assert [back.first_step(e) for e in range(4)] == [0, 1, 4, 7]
    np.testing.assert_array_equal(back.epoch_of_step(np.arange(7)), [0, 1, 1, 1, 2, 2, 2])


def switching_config(**overrides):
    config = tiny_config(
        train__mode="stochastic", train__batch_size=32, train__switch_mode_after=2, **overrides
    )
    config.train.epochs = 4
    config.eval.every_epochs = 1
    config.checkpoint.every_epochs = 1
    return config


def test_sgd_then_full_batch_in_one_run(tmp_path):
    config = switching_config()
    train.train_and_evaluate(config, str(tmp_path))
    records = rundir.read_metrics(tmp_path)
    assert [r["images"] for r in records] == [128, 128, 128, 128]
    run = experiment.build(config)
    assert [len(run.epoch_layouts(e)) for e in range(4)] == [4, 4, 1, 1]
    # The schedule moves once per epoch in both modes (warmup 1, cosine over 8 epochs).
    expected = [0.0, 0.2] + [0.2 * (1 + math.cos(math.pi * (e - 2) / 8)) / 2 for e in (2, 3)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # The optimizer took 4 + 4 + 1 + 1 steps.
    assert int(restore(tmp_path, 4)["penalty_state"]["count"]) == 10


def test_ema_and_the_switch_survive_a_kill_bitwise(tmp_path, monkeypatch):
    config = switching_config(eval__ema=True, eval__ema_momentum=0.5)
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    resumed = killed_and_resumed(config, tmp_path / "killed", monkeypatch, dies_in_epoch=4)
    assert strip_timing([resumed]) == strip_timing([whole])
    a, b = restore(tmp_path / "whole", 4), restore(tmp_path / "killed", 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_ema_follows_its_recursion_and_is_evaluated(tmp_path):
    momentum = 0.75
    config = tiny_config(eval__ema=True, eval__ema_momentum=momentum, eval__every_epochs=1)
    config.checkpoint.every_epochs = 1
    train.train_and_evaluate(config, str(tmp_path))
    run = experiment.build(config)
    average = experiment.initial_state(run).params
    for epoch in range(1, 5):
        params = restore(tmp_path, epoch)["params"]
        average = jax.tree.map(lambda a, p: momentum * a + (1 - momentum) * p, average, params)
        got = restore(tmp_path, epoch)["ema"]["params"]
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got, average
        )
    records = rundir.read_metrics(tmp_path)
    assert all("test_accuracy_ema" in r and "test_loss_ema" in r for r in records)
    assert records[-1]["test_loss_ema"] != records[-1]["test_loss"]


def test_turning_ema_on_for_a_running_run_is_refused(tmp_path):
    config = tiny_config(train__epochs=1)
    train.train_and_evaluate(config, str(tmp_path))
    config.eval.ema = True
    config.train.epochs = 2
    with pytest.raises(ConfigError, match=r"eval\.ema"):
        train.train_and_evaluate(config, str(tmp_path))


def test_sampling_with_replacement():
    config = tiny_config(train__mode="stochastic", train__batch_size=16)
    config.train.sample_with_replacement = True
    run = experiment.build(config)
    drawn = np.concatenate(run.epoch_layouts(0)).ravel()
    assert drawn.shape == (128,) and drawn.min() >= 0 and drawn.max() < 128
    assert len(np.unique(drawn)) < 128  # P(no repeat among 128 draws of 128) ~ 1e-54
    np.testing.assert_array_equal(drawn, np.concatenate(run.epoch_layouts(0)).ravel())
    assert not np.array_equal(drawn, np.concatenate(run.epoch_layouts(1)).ravel())


def test_semi_stochastic_epochs_cycle_through_the_augmented_copies():
    config = tiny_config(
        train__mode="stochastic", train__batch_size=16, train__semi_stochastic=True
    )
    config.data.augmentation = "fixed"
    config.data.copies = 3
    run = experiment.build(config)
    for epoch in range(5):
        views = np.concatenate(run.epoch_layouts(epoch)).ravel()
        copy = epoch % 3
        np.testing.assert_array_equal(np.sort(views), np.arange(128) + 128 * copy)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"train__semi_stochastic": True, "train__mode": "stochastic"}, "train.semi_stochastic"),
        ({"train__sample_with_replacement": True}, "train.sample_with_replacement"),
        ({"train__switch_mode_after": -1}, "train.switch_mode_after"),
        ({"eval__ema_momentum": 1.0}, "eval.ema_momentum"),
    ],
)
def test_bad_loop_options_name_their_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        experiment.build(tiny_config(**changes))


def test_fitted():
    assert train.fitted([0.5, 1.0, 1.0], 2) and not train.fitted([1.0, 0.9, 1.0], 2)
    assert not train.fitted([1.0], 2) and not train.fitted([1.0, 1.0], 0)


def test_stop_at_full_accuracy_ends_the_run_and_a_rerun_stays_stopped(tmp_path, monkeypatch):
    config = tiny_config(train__epochs=8, train__stop_at_full_accuracy=2)
    config.checkpoint.every_epochs = 0
    config.eval.every_epochs = 0
    real_run_epoch = train.run_epoch

    def fits_from_epoch_three(run, state, train_step):
        state, record = real_run_epoch(run, state, train_step)
        if record["epoch"] >= 3:
            record["train_accuracy"] = 1.0
        return state, record

    monkeypatch.setattr(train, "run_epoch", fits_from_epoch_three)
    last = train.train_and_evaluate(config, str(tmp_path))
    records = rundir.read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert last["epoch"] == 4 and "test_accuracy" in last
    assert os.listdir(tmp_path / rundir.CHECKPOINT_DIR) == ["4"]
    again = train.train_and_evaluate(config, str(tmp_path))
    assert len(rundir.read_metrics(tmp_path)) == 4 and again["epoch"] == 4


def test_analysis_metrics_reach_the_metrics_stream(tmp_path):
    config = tiny_config(analysis__every_epochs=2)
    config.train.epochs = 3
    train.train_and_evaluate(config, str(tmp_path))
    records = rundir.read_metrics(tmp_path)
    with_analysis = [r["epoch"] for r in records if "analysis_grad_noise_scale" in r]
    assert with_analysis == [2, 3]  # every 2 epochs and at the end
    assert records[1]["analysis_param_norm"] > 0 and records[1]["analysis_momentum_norm"] > 0


@pytest.mark.parametrize("clip_norm, clipped", [(1e-6, 1.0), (1e6, 0.0)])
def test_clipping_in_the_infinity_norm_runs_in_the_training_step(clip_norm, clipped):
    config = tiny_config(optim__clip_norm_type="inf", optim__clip_norm=clip_norm)
    run = experiment.build(config)
    state = jax.tree.map(lambda x: x, experiment.initial_state(run))
    from gdreg.engine.mesh import replicate

    _, record = train.run_epoch(run, replicate(state, run.mesh), train.make_step(run))
    assert record["clipped"] == clipped and math.isfinite(record["train_loss"])


def test_an_update_that_overflows_the_parameters_is_not_applied(tmp_path):
    config = tiny_config(optim__lr=3e38, optim__warmup_epochs=0, optim__clip_norm=0.0)
    config.checkpoint.every_epochs = 1
    with pytest.raises(train.TrainingDivergedError, match=r"epoch 0 \(step 0\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / rundir.CHECKPOINT_DIR) or not os.listdir(
        tmp_path / rundir.CHECKPOINT_DIR
    )


def test_resuming_with_another_epoch_plan_is_refused(tmp_path):
    config = tiny_config(train__mode="stochastic", train__batch_size=32, train__epochs=1)
    train.train_and_evaluate(config, str(tmp_path))
    config.train.batch_size = 16
    config.train.epochs = 2
    with pytest.raises(ConfigError, match="took 4 optimizer steps, and this config takes 8"):
        train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"optim__modification": "sam", "optim__line_search": "armijo"},
            r"optim\.line_search .*cannot be combined",
        ),
        (
            {"train__mode": "stochastic", "train__semi_stochastic": True, "train__batch_size": 256},
            r"train\.batch_size 256 is larger than the 128",
        ),
    ],
)
def test_combinations_that_cannot_run(changes, message):
    config = tiny_config(**changes)
    config.data.augmentation = "fixed"
    config.data.copies = 4
    with pytest.raises(ConfigError, match=message):
        experiment.build(config)
