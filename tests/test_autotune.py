"""The loop-shape autotuner (gdreg.program.autotune): candidates, timing, the stored choice, resume.

Most tests fake the timer (``loop_shape._time_shape``) so that a known shape wins and every
timing is counted; the real timer runs in tests/test_bench.py (``--sweep``).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest
import two_processes
from jax.flatten_util import ravel_pytree
from problems import tiny_run_config

from gdreg import gradient_norm_penalty
from gdreg.engine import loop_shape
from gdreg.engine.fullbatch import FullBatchGradient, block_layout
from gdreg.engine.loop_shape import LoopShape
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.program import autotune, experiment, rundir
from gdreg.program import loop as train
from gdreg.program.rundir import RunDirError

HERE = os.path.dirname(__file__)
DEFAULT_CPU = LoopShape(1, "python", "unroll")
WINNER = LoopShape(2, "scan", "vmap")


class FakeTimer:
    """Stands in for ``loop_shape._time_shape``: ``WINNER`` is fastest, ``out_of_memory`` fails."""

    def __init__(self, winner=WINNER, out_of_memory=()):
        self.winner = winner
        self.out_of_memory = set(out_of_memory)
        self.calls = []  # (shape, blocks in the timed layout)

    def __call__(self, engine, arguments, layout, steps):
        shape = LoopShape(engine.blocks_per_microbatch, engine.microbatch_loop, engine.block_loop)
        self.calls.append((shape, len(layout)))
        if shape in self.out_of_memory:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (fake)")
        return 3.0, 1.0 if shape == self.winner else 2.0


@pytest.fixture
def fake_timer(monkeypatch):
    timer = FakeTimer()
    monkeypatch.setattr(loop_shape, "_time_shape", timer)
    return timer


def tiny_config(**train_fields):
    """convnet1 on 128 8x8 images in 32 blocks of 4: 4 blocks on each of the 8 test devices."""
    config = tiny_run_config()
    config.train.block_size = 4
    config.train.epochs = 2
    config.train.autotune = "on"
    config.eval.every_epochs = 0
    config.eval.batch_size = 64
    config.checkpoint.every_epochs = 1
    config.log.tensorboard = False
    for field, value in train_fields.items():
        config.train[field] = value
    return config


@pytest.fixture(scope="module")
def tiny():
    run = experiment.build(tiny_config())
    return run, replicate(experiment.initial_state(run), run.mesh)


def shape_of(engine):
    return LoopShape(engine.blocks_per_microbatch, engine.microbatch_loop, engine.block_loop)


# ----- candidates and timing ----------------------------------------------------------------


def test_candidates_skip_repeats_and_respect_fixed_fields():
    default = LoopShape(4, "python", "unroll")
    shapes = loop_shape.candidate_shapes({}, 5, default)
    assert shapes[0] == default
    assert sorted(shapes) == sorted(
        [
            LoopShape(1, "python", "unroll"),
            LoopShape(1, "scan", "unroll"),  # vmap over one block is its unroll
            *[
                LoopShape(size, loop, inner)
                for size in (2, 4)
                for loop in ("python", "scan")
                for inner in ("unroll", "vmap")
            ],
        ]
    )  # 8 and 16 exceed the 5 blocks per device
    assert len(set(shapes)) == len(shapes)
    # One microbatch per device: a scan would be the Python loop's single call.
    assert loop_shape.candidate_shapes({}, 2, DEFAULT_CPU) == [
        DEFAULT_CPU,
        LoopShape(1, "scan", "unroll"),
        LoopShape(2, "python", "unroll"),
        LoopShape(2, "python", "vmap"),
    ]
    # A stochastic step (one block for all devices) has a single candidate.
    assert loop_shape.candidate_shapes({}, 0, DEFAULT_CPU) == [DEFAULT_CPU]
    fixed = loop_shape.candidate_shapes(
        {"microbatch_loop": "scan", "block_loop": "vmap"}, 64, default
    )
    assert fixed == [LoopShape(size, "scan", "vmap") for size in (1, 2, 4, 8, 16)]
    # A fixed size may exceed the blocks per device, and is the only size.
    assert loop_shape.candidate_shapes({"blocks_per_microbatch": 32}, 3, default) == [
        LoopShape(32, "python", "unroll"),
        LoopShape(32, "python", "vmap"),
    ]


def test_time_per_step_is_scaled_from_the_probe_by_microbatch_calls(tiny, fake_timer):
    run, _ = tiny
    layout = np.zeros((1000, 4), np.int32)  # 125 blocks per device, more than the probe
    shapes = [LoopShape(1, "python", "unroll"), LoopShape(16, "scan", "unroll")]
    trials = loop_shape.time_loop_shapes(
        run.engine,
        loop_shape.EngineArguments(None, None, None, None, 0),
        layout,
        shapes,
        budget_seconds=60,
    )
    # The probe: 2 microbatches of 16 blocks on each of the 8 devices.
    assert fake_timer.calls == [(shape, 8 * 16 * 2) for shape in shapes]
    assert trials[0].seconds_per_step == pytest.approx(2.0 * 125 / 32)  # 32 calls of 1 block
    assert trials[1].seconds_per_step == pytest.approx(2.0 * 8 / 2)  # ceil(1000 / 128) = 8 calls
    assert trials[0].compile_seconds == 3.0


def test_out_of_memory_is_skipped_and_the_budget_stops_new_candidates(tiny, monkeypatch):
    run, _ = tiny
    arguments = loop_shape.EngineArguments(None, None, None, None, 0)
    layout = np.zeros((32, 4), np.int32)
    shapes = loop_shape.candidate_shapes({}, 4, DEFAULT_CPU)
    timer = FakeTimer(out_of_memory={WINNER})
    monkeypatch.setattr(loop_shape, "_time_shape", timer)
    trials = loop_shape.time_loop_shapes(run.engine, arguments, layout, shapes, budget_seconds=60)
    assert [t.skipped for t in trials] == [
        "out of memory" if t.shape == WINNER else None for t in trials
    ]
    assert loop_shape.fastest(trials, DEFAULT_CPU) == DEFAULT_CPU  # every other one takes 2.0
    assert any("skipped=out_of_memory" in t.describe() for t in trials)
    # No budget: nothing is timed and the default stands.
    timer.calls.clear()
    trials = loop_shape.time_loop_shapes(run.engine, arguments, layout, shapes, budget_seconds=0)
    assert timer.calls == [] and {t.skipped for t in trials} == {"budget spent"}
    assert loop_shape.fastest(trials, DEFAULT_CPU) == DEFAULT_CPU

    def broken(*args):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(loop_shape, "_time_shape", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        loop_shape.time_loop_shapes(run.engine, arguments, layout, shapes, budget_seconds=60)


def naive_full_batch(params, model_state, layout, penalty):
    """jax.grad per block, the exact (jvp) penalty per block, means over blocks; no sharding."""
    images, labels = problems.dataset()

    @jax.jit
    def block_terms(x, y):
        (loss, (state, _)), g = jax.value_and_grad(problems.loss_fn, has_aux=True)(
            params, model_state, x, y
        )
        sq_norm = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g))
        g, _ = penalty.update(
            g,
            penalty.init(params),
            params,
            penalty_grad_fn=jax.grad(lambda p: problems.loss_fn(p, model_state, x, y)[0]),
        )
        return ravel_pytree(g)[0], loss, sq_norm, ravel_pytree(state)[0]

    terms = [block_terms(images[block], labels[block]) for block in layout]
    grads, losses, sq_norms, states = (
        np.asarray(column, np.float64) for column in zip(*terms, strict=True)
    )
    return {
        "grads": grads.mean(axis=0),
        # the "mean" rule: one momentum step (0.1) with the mean of the block statistics
        "model_state": 0.9 * ravel_pytree(model_state)[0] + 0.1 * states.mean(axis=0),
        "loss": losses.mean(),
        "block_grad_sq_norm": sq_norms.mean(),
    }


def test_every_candidate_gives_the_naive_full_batch_gradient():
    # 6 blocks on 2 devices: 3 per device, so 2 blocks per microbatch pad with a zero block
    # and make 2 microbatches (a real scan).
    params, model_state = problems.init()
    layout = block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)[:6]
    penalty = gradient_norm_penalty(strength=0.5, learning_rate=0.1, method="jvp")
    expected = naive_full_batch(params, model_state, layout, penalty)
    mesh = data_mesh(jax.devices()[:2])
    engine = FullBatchGradient(
        problems.loss_fn,
        problems.batch_fn,
        mesh=mesh,
        penalty=penalty,
        batchnorm_statistics="mean",
    )
    shapes = loop_shape.candidate_shapes({}, 3, DEFAULT_CPU)
    assert len(shapes) == 6 and {s.microbatch_loop for s in shapes} == {"python", "scan"}
    arguments = (
        replicate(params, mesh),
        replicate(model_state, mesh),
        replicate(penalty.init(params), mesh),
        replicate(problems.dataset(), mesh),
    )
    for shape in shapes:
        result = engine.replace(**shape._asdict())(*arguments, layout, 0)
        got = {
            "grads": ravel_pytree(fetch_replicated(result.grads))[0],
            "model_state": ravel_pytree(fetch_replicated(result.model_state))[0],
            **fetch_replicated(result.metrics),
        }
        for key, value in expected.items():
            np.testing.assert_allclose(
                got[key], value, rtol=2e-5, atol=1e-6, err_msg=f"{key} with {shape}"
            )


# ----- the choice in the workdir ----------------------------------------------------------


def test_the_choice_is_stored_and_reused_without_timing(tiny, fake_timer, tmp_path):
    run, state = tiny
    tuned = autotune.choose_loop_shape(run, state, str(tmp_path))
    assert shape_of(tuned.engine) == WINNER
    assert len(fake_timer.calls) == len(loop_shape.candidate_shapes({}, 4, DEFAULT_CPU)) == 8
    stored = json.loads((tmp_path / rundir.LOOP_SHAPE_FILE).read_text())
    assert LoopShape(*(stored[f] for f in LoopShape._fields)) == WINNER
    assert stored["devices"] == 8 and len(stored["timing"]) == 8
    # A resumed run (even one told to time) reuses it.
    again = autotune.choose_loop_shape(run, state, str(tmp_path))
    assert shape_of(again.engine) == WINNER and len(fake_timer.calls) == 8


def test_explicit_settings_win_over_the_stored_shape(tiny, fake_timer, tmp_path, caplog):
    run, state = tiny
    rundir.write_loop_shape(str(tmp_path), WINNER._asdict())
    explicit = experiment.build(tiny_config(microbatch_loop="python"), run.dataset)
    with caplog.at_level(logging.WARNING):
        chosen = autotune.choose_loop_shape(explicit, state, str(tmp_path))
    assert shape_of(chosen.engine) == LoopShape(2, "python", "vmap")
    assert "replace those stored" in caplog.text
    assert rundir.read_loop_shape(str(tmp_path))["microbatch_loop"] == "python"
    assert fake_timer.calls == []
    # All three set and nothing stored: nothing is timed, and the settings are stored.
    (tmp_path / "new").mkdir()
    fixed = tiny_config(blocks_per_microbatch=4, microbatch_loop="python", block_loop="vmap")
    chosen = autotune.choose_loop_shape(
        experiment.build(fixed, run.dataset), state, str(tmp_path / "new")
    )
    assert shape_of(chosen.engine) == LoopShape(4, "python", "vmap") and fake_timer.calls == []
    assert rundir.read_loop_shape(str(tmp_path / "new"))["blocks_per_microbatch"] == 4


def test_auto_on_cpu_off_and_old_resumed_runs_take_the_defaults(tiny, fake_timer, tmp_path):
    run, state = tiny
    for name in ("auto", "off", "old"):
        (tmp_path / name).mkdir()
    for mode in ("auto", "off"):  # XLA:CPU's best shape is known: nothing is timed
        plain = experiment.build(tiny_config(autotune=mode), run.dataset)
        assert shape_of(autotune.choose_loop_shape(plain, state, str(tmp_path / mode)).engine) == (
            DEFAULT_CPU
        )
    # A run resumed from a checkpoint written before shapes were stored trained with the default.
    resumed = state._replace(epoch=replicate(np.asarray(3, np.int32), run.mesh))
    chosen = autotune.choose_loop_shape(run, resumed, str(tmp_path / "old"))
    assert shape_of(chosen.engine) == DEFAULT_CPU and fake_timer.calls == []
    assert rundir.read_loop_shape(str(tmp_path / "old"))["microbatch_loop"] == "python"


def test_a_damaged_shape_file_is_an_error_unless_every_field_is_set(tiny, fake_timer, tmp_path):
    run, state = tiny
    (tmp_path / rundir.LOOP_SHAPE_FILE).write_text('{"blocks_per_microbatch": 0}')
    with pytest.raises(
        RunDirError, match=r"loop_shape\.json: not a loop shape.*or delete the file"
    ):
        autotune.choose_loop_shape(run, state, str(tmp_path))
    fixed = tiny_config(blocks_per_microbatch=1, microbatch_loop="scan", block_loop="unroll")
    chosen = autotune.choose_loop_shape(experiment.build(fixed, run.dataset), state, str(tmp_path))
    assert shape_of(chosen.engine) == LoopShape(1, "scan", "unroll")
    assert rundir.read_loop_shape(str(tmp_path))["microbatch_loop"] == "scan"


def test_training_times_once_and_resumes_with_the_stored_shape(tmp_path, monkeypatch):
    winner = LoopShape(2, "python", "unroll")  # not the default, and quick to compile
    fake_timer = FakeTimer(winner)
    monkeypatch.setattr(loop_shape, "_time_shape", fake_timer)
    used = []
    real_with_loop_shape = autotune.with_loop_shape

    def spy(run, shape):
        run = real_with_loop_shape(run, shape)
        used.append(shape_of(run.engine))
        return run

    monkeypatch.setattr(autotune, "with_loop_shape", spy)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(epochs=1), workdir)
    timings = len(fake_timer.calls)
    assert timings == 8 and used == [winner]
    train.train_and_evaluate(tiny_config(epochs=2), workdir)  # resumes at epoch 1
    assert len(fake_timer.calls) == timings and used == [winner, winner]
    assert [r["epoch"] for r in rundir.read_metrics(workdir)] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in rundir.read_metrics(workdir))


def test_stochastic_steps_take_one_block_per_call(tiny, fake_timer, tmp_path, monkeypatch):
    run, state = tiny
    config = tiny_config()
    config.train.mode = "stochastic"
    config.train.batch_size = 16
    sgd = experiment.build(config, run.dataset)
    chosen = autotune.choose_loop_shape(sgd, state, str(tmp_path))
    assert shape_of(chosen.engine) == DEFAULT_CPU and fake_timer.calls == []
    # Without timing on a GPU: 4 blocks per call in full batch, 1 (no padding blocks) for SGD.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert experiment.loop_settings(config)["blocks_per_microbatch"] == 1
    assert experiment.loop_settings(tiny_config())["blocks_per_microbatch"] == 4


# ----- several processes --------------------------------------------------------------------


def test_every_process_takes_process_zeros_decisions(tmp_path):
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    two_processes.run_workers("autotune_worker.py", outs, timeout=180)
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert result["choice"] == [2, "python", "vmap"]  # process 0's fastest
        assert result["stored"] == [[4, "scan", "vmap"], 8, 2]  # what process 0 read
        assert len(result["table"]) == 4 and not any("budget" in line for line in result["table"])
    assert "skipped=out_of_memory" in results[1]["table"][3]  # process 1's own failure
