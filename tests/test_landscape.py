"""python -m gdreg.tools.landscape: filter-normalized directions and the loss around a checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from problems import tiny_run_config

from gdreg.engine import directions
from gdreg.engine.mesh import fetch_replicated, replicate
from gdreg.program import experiment, rundir, saved_run
from gdreg.program import loop as train
from gdreg.tools import landscape


def tiny_config(epochs: int = 2):
    """Full batch with every feature that changes the loss evaluation: penalty, clipping,
    random augmentation and blocks redrawn every step."""
    config = tiny_run_config()
    config.row = "practice"
    config.train.epochs = epochs
    config.train.block_size = 32
    config.train.shuffle_blocks = True
    config.optim.lr = 0.1
    config.optim.warmup_epochs = 1
    config.optim.cosine_epochs = 4
    config.eval.every_epochs = 0
    config.checkpoint.every_epochs = 0
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(), path)
    return path


def test_filter_normalization_matches_parameter_filter_norms():
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 5)), "bias": rng.normal(size=(5,))},
        "dense": {"kernel": rng.normal(size=(7, 4)) * np.arange(1, 5)},
        "bn": {"scale": np.ones(5), "bias": np.zeros(5)},
    }
    direction = directions.random_direction(params, seed=3, index=0)
    for name, axes in (("conv", (0, 1, 2)), ("dense", (0,))):
        d = direction[name]["kernel"]
        p = params[name]["kernel"]
        assert d.shape == p.shape
        np.testing.assert_allclose(
            np.linalg.norm(d.reshape(-1, d.shape[-1]), axis=0),
            np.sqrt(np.sum(np.square(p), axis=axes)),
            rtol=1e-5,
        )
        assert not np.allclose(d, p)  # a random direction, not the parameters themselves
    for leaf in (direction["conv"]["bias"], direction["bn"]["scale"], direction["bn"]["bias"]):
        assert np.all(leaf == 0)
    # deterministic in the seed, different directions for different indices
    again = directions.random_direction(params, seed=3, index=0)
    other = directions.random_direction(params, seed=3, index=1)
    np.testing.assert_array_equal(again["dense"]["kernel"], direction["dense"]["kernel"])
    assert not np.allclose(other["dense"]["kernel"], direction["dense"]["kernel"])


def test_distance_zero_is_the_checkpoint_training_loss(workdir, tmp_path):
    result = landscape.compute_landscape(workdir, directions=1, points=3, span=0.5, progress=False)
    assert result["epoch"] == 2
    assert result["alpha"] == [-0.5, 0.0, 0.5]
    center = result["center"]["loss"]
    assert result["loss"][1] == pytest.approx(center, rel=1e-6)
    assert result["accuracy"][1] == pytest.approx(result["center"]["accuracy"])
    assert result["loss"][0] > center and result["loss"][2] > center

    # the training engine (penalty and all) at the checkpoint, on the layout of epoch 2
    run = experiment.build(rundir.read_config(workdir))
    state = saved_run.load_checkpoint(run, workdir)
    layout = run.epoch_layouts(2)[0]
    assert result["layout"]["blocks"] == layout.shape[0] == 4
    on_mesh = replicate(state, run.mesh)
    metrics = fetch_replicated(
        run.engine(
            on_mesh.params,
            on_mesh.model_state,
            on_mesh.penalty_state,
            run.train_data,
            layout,
            2,
        ).metrics
    )
    assert center == pytest.approx(float(metrics["loss"]), rel=1e-5)
    assert result["center"]["accuracy"] == pytest.approx(float(metrics["accuracy"]))

    # ... and the loss the training log reports for the next epoch
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    train.train_and_evaluate(tiny_config(epochs=3), resumed)
    record = rundir.read_metrics(resumed)[-1]
    assert record["epoch"] == 3
    assert center == pytest.approx(record["train_loss"], rel=1e-5)

    # In the same test, so that under pytest-xdist one worker trains the run, not two.
    check_two_directions_write_json_csv_and_contour_plot(workdir, str(tmp_path / "out"))


def check_two_directions_write_json_csv_and_contour_plot(workdir, out):
    assert (
        landscape.main(
            ["--workdir", workdir, "--directions", "2", "--points", "3", "--out", out, "--test"]
        )
        == 0
    )
    with open(os.path.join(out, "landscape.json")) as handle:
        result = json.load(handle)
    assert result["directions"] == 2 and result["beta"] == result["alpha"]
    loss = np.asarray(result["loss"])
    assert loss.shape == (3, 3) and np.all(np.isfinite(loss))
    assert loss[1, 1] == pytest.approx(result["center"]["loss"], rel=1e-6)
    assert np.asarray(result["test_accuracy"]).shape == (3, 3)
    with open(os.path.join(out, "landscape.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    assert list(rows[0]) == ["alpha", "beta", "loss", "accuracy", "test_loss", "test_accuracy"]
    assert float(rows[4]["alpha"]) == 0 and float(rows[4]["beta"]) == 0
    assert float(rows[4]["loss"]) == pytest.approx(loss[1, 1], rel=1e-6)
    # With --test the test loss is drawn beside the training loss, each panel titled.
    picture = mpimg.imread(os.path.join(out, "landscape.png"))
    assert picture.shape[:2] == (600, 1400)
    figure = landscape.landscape_figure(result)
    assert figure.get_suptitle() == (
        "FB in practice, epoch 2: training and test loss along two directions\n"
        "convnet1 (width 4) on synthetic 8x8x3, 128 images"
    )
    panels = [axis for axis in figure.get_axes() if axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["training loss", "test loss"]
    colorbars = [axis.get_ylabel() for axis in figure.get_axes() if not axis.get_title()]
    assert [label.split(" (")[0] for label in colorbars] == ["training loss", "test loss"]
    # Without --test: one panel, and the title says training loss only.
    alone = {key: value for key, value in result.items() if not key.startswith("test_")}
    figure = landscape.landscape_figure(alone)
    assert figure.get_suptitle().startswith("FB in practice, epoch 2: training loss along")
    assert [axis.get_title() for axis in figure.get_axes() if axis.get_title()] == ["training loss"]

    # Each call's picture in the run's TensorBoard, in the run's picture run at the
    # checkpoint's epoch, under a tag of its settings: a second call keeps the first picture.
    assert landscape.main(["--workdir", workdir, "--points", "3", "--out", out]) == 0
    import tensorflow as tf

    images = [
        (value.tag, event.step, value.image.height, value.image.width)
        for events in (Path(workdir) / rundir.PICTURES_DIR).glob(rundir.EVENTS_PATTERN)
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
        if value.HasField("image")
    ]
    assert sorted(images) == [
        ("landscape/1d_span1_points3_seed0", 2, 600, 900),
        ("landscape/2d_span1_points3_seed0_test", 2, 600, 1400),
    ]


def test_stochastic_runs_use_the_epoch_minibatches_as_blocks():
    config = tiny_config()
    config.train.mode = "stochastic"
    config.train.batch_size = 48
    run = experiment.build(config)
    layout = run.epoch_blocks(5)
    assert layout.shape == (2, 48)  # 128 // 48 minibatch steps
    np.testing.assert_array_equal(layout, np.concatenate(run.epoch_layouts(5)))


def test_clear_errors(tmp_path, capsys):
    assert landscape.main(["--workdir", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    with open(os.path.join(tmp_path, "config.json"), "w") as handle:
        handle.write(tiny_config().to_json_best_effort())
    assert landscape.main(["--workdir", str(tmp_path)]) == 2
    assert "no checkpoints/" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing created on the way
    assert landscape.main(["--workdir", str(tmp_path), "--directions", "2", "--points", "1"]) == 2
    assert "--points must be at least 2" in capsys.readouterr().err


def test_one_direction_titles_and_labels_name_what_is_drawn():
    """The 1D picture, from a result made up here: the title says which loss is drawn,
    the axes say their units (accuracy in %)."""
    alpha = [-1.0, 0.0, 1.0]
    result = {
        "workdir": "/runs/mine",
        "row": "",
        "epoch": 7,
        "model": "convnet2 (width 16)",
        "data": "8x8 digits",
        "directions": 1,
        "points": 3,
        "span": 1.0,
        "seed": 0,
        "alpha": alpha,
        "loss": [2.0, 0.5, 2.5],
        "accuracy": [0.5, 0.9, 0.4],
    }
    figure = landscape.landscape_figure(result)
    assert figure.get_suptitle() == (
        "mine, epoch 7: training loss along a filter-normalized direction\n"
        "convnet2 (width 16) on 8x8 digits"
    )
    loss_axis, accuracy_axis = figure.get_axes()
    assert loss_axis.get_ylabel() == "loss (cross-entropy)"
    assert accuracy_axis.get_ylabel() == "accuracy (%)"
    np.testing.assert_allclose(accuracy_axis.get_lines()[0].get_ydata(), [50, 90, 40])
    assert landscape.picture_tag(result) == "landscape/1d_span1_points3_seed0"

    tested = {**result, "test_loss": [2.2, 0.7, 2.6], "test_accuracy": [0.4, 0.8, 0.3]}
    figure = landscape.landscape_figure(tested)
    assert figure.get_suptitle().startswith("mine, epoch 7: training and test loss along")
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["training loss", "test loss", "training accuracy", "test accuracy"]
    assert landscape.picture_tag(tested) == "landscape/1d_span1_points3_seed0_test"
