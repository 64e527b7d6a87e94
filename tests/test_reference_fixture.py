"""gdreg's first 5 float64 steps equal the reference implementation's, to 1e-10 relative.

tests/fixtures/reference_steps.npz holds numbers produced by the paper authors' own training
loop (``train()`` of github.com/JonasGeiping/fullbatchtraining, run in float64 by
tests/fixtures/make_reference_fixture.py, which says how to regenerate it) from gdreg's initial
weights on the same inputs: ResNet-18 at width 16 on 128 random 8x8 images, blocks of 32, the
"FB regularized" hyperparameters, warmup 0 and 2. gdreg runs the same steps through its own
training loop (:func:`gdreg.program.loop.run_epoch`) in float64 with the "reference" BatchNorm rule,
on two devices; parameters, momentum buffers and BatchNorm running statistics are compared after
every step, and so are the reference's logged figures with ``reference_*`` metrics.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from gdreg.engine.mesh import data_mesh, replicate
from gdreg.program import experiment
from gdreg.program import loop as train

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "make_reference_fixture", os.path.join(HERE, "fixtures", "make_reference_fixture.py")
)
fixture_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_lib)

RTOL = 1e-10


def summaries(prefix, tree):
    return {
        f"{prefix}/{path}": fixture_lib.summary(f"{prefix}/{path}", np.asarray(value))
        for path, value in flatten_dict(jax.tree.map(np.asarray, tree), sep="/").items()
    }


def relative_error(actual, expected):
    """Entry by entry: each sampled value and the norm (the summary's last entry) against its
    own size, with sizes below 1e-6 of the tensor's norm counted as that (exact zeros)."""
    scale = np.maximum(np.abs(expected), max(1e-6 * abs(expected[-1]), 1e-300))
    return float(np.max(np.abs(actual - expected) / scale))


@pytest.mark.parametrize("warmup", fixture_lib.WARMUPS)
def test_five_float64_steps_equal_the_reference_implementation(x64, warmup):
    expected = dict(np.load(os.path.join(HERE, "fixtures", "reference_steps.npz")))
    prefix = f"w{warmup}"
    dataset = fixture_lib.gdreg_dataset()
    config = fixture_lib.gdreg_config(warmup)
    run = experiment.build(config, dataset)
    inputs, _ = fixture_lib.gdreg_inputs(run)  # both sides saw the same inputs
    np.testing.assert_array_equal(fixture_lib.summary("inputs", inputs), expected["inputs"])
    run = type(run)(**{**run.__dict__, "mesh": data_mesh(jax.devices()[:2])})
    run = type(run)(
        **{
            **run.__dict__,
            "engine": run.engine.replace(mesh=run.mesh),
            "train_data": replicate(
                {"images": dataset.train_images, "labels": dataset.train_labels}, run.mesh
            ),
        }
    )
    host = experiment.initial_state(run)
    as64 = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)  # noqa: E731
    params, model_state = as64(host.params), as64(host.model_state)
    state = experiment.TrainState(
        epoch=host.epoch,
        params=params,
        model_state=model_state,
        opt_state=run.optimizer.tx.init(params),
        penalty_state=run.optimizer.penalty.init(params),
    )
    state = replicate(state, run.mesh)
    train_step = train.make_step(run)
    worst = {}
    for k in range(1, fixture_lib.STEPS + 1):
        state, record = train.run_epoch(run, state, train_step)
        momentum = optax.tree_utils.tree_get(state.opt_state, "trace")
        got = {
            **summaries("params", state.params),
            **summaries("momentum", momentum),
            **summaries("batch_stats", state.model_state["batch_stats"]),
        }
        for name, value in got.items():
            assert value.dtype == np.float64
            error = relative_error(value, expected[f"{prefix}/k{k}/{name}"])
            worst[name.split("/")[0]] = max(worst.get(name.split("/")[0], 0.0), error)
            assert error < RTOL, (k, name, error)
        i = k - 1
        figures = {
            "lr": record["lr"],
            "train_loss": record["train_loss"],
            "grad_norm": record["reference_grad_norm"],
            "preclip_gradnorm": record["reference_preclip_gradnorm"],
            "full_loss": record["reference_full_loss"],
            "param_norm": record["reference_param_norm"],
        }
        for name, value in figures.items():
            reference = expected[f"{prefix}/{name}"][i]
            assert value == pytest.approx(reference, rel=RTOL, abs=1e-300), (k, name)
    print(f"warmup {warmup}: worst relative errors over 5 steps {worst}")
