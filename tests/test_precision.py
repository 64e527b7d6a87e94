"""``python -m gdreg.tools.precision``: the float32 full-batch gradient against float64, on tiny runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from problems import tiny_run_config

from gdreg.tools import precision

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--config=configs/resnet18_fb.py:strong",
    "--config.model.name=convnet1",
    "--config.model.width=4",
    "--config.data.name=synthetic",
    "--config.data.synthetic_shape=(8, 8, 3)",
    "--config.data.synthetic_train_size=64",
    "--config.train.block_size=16",
]


def run_command(args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "gdreg.tools.precision", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def parse(stdout):
    rows = [dict(field.split("=", 1) for field in line.split()) for line in stdout.splitlines()]
    figures = {key: value for row in rows if "leaf" not in row for key, value in row.items()}
    return figures, [row for row in rows if "leaf" in row]


def test_float32_gradient_of_a_tiny_run_is_close_to_float64():
    result = run_command(TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    figures, leaves = parse(result.stdout)
    assert figures["dtype"] == "float32" and figures["reference"] == "float64"
    assert (figures["images"], figures["blocks"], figures["epoch"]) == ("64", "4", "0")
    assert 0 < float(figures["relative_error_l2"]) < 1e-4
    assert 0 <= float(figures["loss_relative_error"]) < 1e-5
    np.testing.assert_allclose(float(figures["loss"]), float(figures["loss_float64"]), rtol=1e-5)
    # the penalized gradient of a fresh convnet1 is of order 1, every leaf nonzero
    assert float(figures["grad_norm_l2"]) > 1e-2
    assert sorted(leaf["leaf"] for leaf in leaves) == [
        "conv1/bias",
        "conv1/kernel",
        "fc1/bias",
        "fc1/kernel",
    ]
    for leaf in leaves:
        assert 0 < float(leaf["relative_error_l2"]) < 1e-4
        assert float(leaf["max_error"]) <= float(figures["error_linf"])


@pytest.mark.parametrize(
    "args",
    [
        ["--config=configs/no_such_file.py"],
        [*TINY, "--config.penalty.method=backward"],
        ["--workdir=no-such-run"],
        [],
    ],
    ids=["missing-file", "unknown-method", "no-run", "neither"],
)
def test_bad_input_is_one_error_line_and_exit_2(args):
    result = run_command(args)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout == ""


def _tiny_config():
    config = tiny_run_config()
    config.data.synthetic_train_size = 48
    config.train.block_size = 12
    config.penalty.strength = 0.5
    return config


def test_float64_against_float64_is_exact(x64):
    """Both evaluations in float64 on the same devices: the same program, error 0."""
    config = _tiny_config()
    config.model.dtype = "float64"
    figures = precision.measure(config)
    assert figures["dtype"] == "float64"
    assert figures["grad_norm_l2"] > 0
    for key in ("loss_error", "error_linf", "error_l2", "error_l1", "relative_error_l2"):
        assert figures[key] == 0, key
    assert all(leaf["max_error"] == 0 for leaf in figures["leaves"])


def test_workdir_measures_at_the_latest_checkpoint(tmp_path):
    from gdreg.program.loop import train_and_evaluate

    config = _tiny_config()
    config.train.epochs = 2
    config.optim.warmup_epochs = 0
    config.optim.cosine_epochs = 2
    train_and_evaluate(config, str(tmp_path))
    figures = precision.measure(workdir=str(tmp_path))
    assert figures["epoch"] == 2  # the blocks and augmentation of the epoch after it
    assert 0 < figures["relative_error_l2"] < 1e-4
    with pytest.raises(ValueError, match="either"):
        precision.measure(config, workdir=str(tmp_path))


def test_the_float64_reference_is_float64_from_the_uint8_images(monkeypatch):
    """The float64 evaluation normalizes the images in float64 (numpy's ``(x / 255 - mean) /
    std``), the run's own float32 evaluation in float32: the batches each engine is built with,
    traced as ``measure`` traces them."""
    from gdreg.program import experiment

    batches = []
    make_engine = experiment.make_engine

    def recording(config, model, train_batch, penalty, mesh, *args):
        engine = make_engine(config, model, train_batch, penalty, mesh, *args)
        data = {"images": run_data.train_images, "labels": run_data.train_labels}
        inputs, _ = jax.jit(train_batch)(data, np.arange(8, dtype=np.int32), 0)
        batches.append(np.asarray(inputs))
        return engine

    config = _tiny_config()
    config.data.augmentation = "none"
    run_data = experiment.build(config).dataset
    monkeypatch.setattr(experiment, "make_engine", recording)
    precision.measure(config)
    low, high = batches[-2:]  # measure builds the run first, then the two evaluations
    images = run_data.train_images[:8].astype(np.float64)
    expected = (images / 255.0 - np.asarray(run_data.mean)) / np.asarray(run_data.std)
    assert low.dtype == np.float32 and high.dtype == np.float64
    np.testing.assert_allclose(high, expected, rtol=2**-52, atol=0)
    np.testing.assert_allclose(low, expected, rtol=2**-24, atol=0)
