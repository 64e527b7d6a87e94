"""The training program: end-to-end runs, resume after a kill, configs and input errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from problems import register_tiny_batchnorm_model, tiny_run_config

from gdreg.program import config as config_lib
from gdreg.program import experiment, rundir, summaries
from gdreg.program import loop as train
from gdreg.program.config import paper_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TIMING_FIELDS = ("seconds", "images_per_second")


def tiny_config(**overrides):
    """A config that trains in about a second per epoch: small CNN, 8x8 synthetic images."""
    config = tiny_run_config()
    config.model.name = "convnet2"
    config.train.epochs = 4
    config.train.block_size = 32
    config.optim.lr = 0.2
    config.optim.warmup_epochs = 1
    config.optim.cosine_epochs = 8
    config.eval.every_epochs = 2
    config.eval.batch_size = 32
    config.checkpoint.every_epochs = 2
    config.checkpoint.keep = 5
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


def main_command(workdir, *args, config="configs/resnet18_fb.py:quick"):
    return [sys.executable, "-m", "gdreg.main", f"--config={config}", f"--workdir={workdir}", *args]


TINY_FLAGS = (
    "--config.model.name=convnet2",
    "--config.model.width=4",
    "--config.data.synthetic_shape=(8, 8, 3)",
    "--config.data.synthetic_train_size=128",
    "--config.data.synthetic_test_size=64",
    "--config.data.padding=1",
    "--config.data.train_size=0",
    "--config.data.test_size=0",
    "--config.train.block_size=32",
    "--config.eval.batch_size=32",
    "--config.log.progress=False",
)


def run_main(args, *, timeout=300, env=None):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def restore_params(workdir, epoch):
    path = os.path.join(os.path.abspath(workdir), rundir.CHECKPOINT_DIR)
    with ocp.CheckpointManager(path) as manager:
        restored = manager.restore(epoch, args=ocp.args.StandardRestore())
    return jax.tree.map(np.asarray, restored["params"])


# ----- end to end from the command line ---------------------------------------------------


def test_quick_config_runs_from_the_command_line_on_synthetic_data(tmp_path):
    # The quick variant with a smaller model and images, so that CI compiles it in seconds.
    workdir = tmp_path / "quick"
    result = run_main(
        main_command(
            workdir,
            *TINY_FLAGS,
            "--config.data.name=synthetic",
            "--config.data.synthetic_train_size=256",
            "--config.train.block_size=128",
            "--config.train.epochs=2",
            "--config.eval.every_epochs=1",
            "--config.checkpoint.every_epochs=1",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: epoch 2" in result.stdout
    records = rundir.read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert np.isfinite(record["train_loss"]) and 0 <= record["test_accuracy"] <= 1
        assert record["images"] == 256  # 2 blocks of 128
        assert record["grad_norm"] > 0
    # The warmup starts from 0, as in the reference: the first step does not move the weights.
    assert records[0]["lr"] == 0 and records[1]["lr"] > 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["row"] == "quick" and config["penalty"]["strength"] == 0.5


def test_quick_config_runs_from_the_command_line_on_tfds_mock_data(tmp_path):
    workdir = tmp_path / "mock"
    command = [
        sys.executable,
        os.path.join(HERE, "mock_tfds_main.py"),
        "96",
        f"--config={os.path.join(REPO, 'configs', 'resnet18_fb.py')}:quick",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.data.train_size=64",
        "--config.data.test_size=32",
        "--config.model.name=convnet2",
        "--config.model.width=4",
        "--config.train.block_size=32",
        "--config.train.epochs=1",
    ]
    result = run_main(command)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = rundir.read_metrics(workdir)
    assert record["images"] == 64 and "test_accuracy" in record
    assert os.listdir(workdir / "checkpoints") == ["1"]


# ----- resume -----------------------------------------------------------------------------


class SimulatedKill(Exception):
    pass


def killed_and_resumed(config, workdir, monkeypatch, *, dies_in_epoch: int) -> dict:
    """Trains ``config`` in ``workdir`` until a simulated kill at the start of epoch
    ``dies_in_epoch`` (counted from 1), then resumes it to the end; returns the last record."""
    real_run_epoch = train.run_epoch

    def dies(run, state, train_step):
        if int(jax.device_get(state.epoch)) == dies_in_epoch - 1:
            raise SimulatedKill
        return real_run_epoch(run, state, train_step)

    monkeypatch.setattr(train, "run_epoch", dies)
    with pytest.raises(SimulatedKill):
        train.train_and_evaluate(config, str(workdir))
    monkeypatch.setattr(train, "run_epoch", real_run_epoch)
    return train.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize("mode", ["fullbatch", "stochastic"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch, mode):
    config = tiny_config(train__mode=mode, train__batch_size=32)
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    # killed after epoch 3's metrics, with the last checkpoint at 2
    resumed = killed_and_resumed(config, tmp_path / "killed", monkeypatch, dies_in_epoch=4)

    assert strip_timing(rundir.read_metrics(tmp_path / "killed")) == strip_timing(
        rundir.read_metrics(tmp_path / "whole")
    )
    assert strip_timing([resumed]) == strip_timing([whole])
    a, b = restore_params(tmp_path / "whole", 4), restore_params(tmp_path / "killed", 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # TensorBoard holds every epoch once, with the numbers of metrics.jsonl.
    for run in ("whole", "killed"):
        assert_tensorboard_equals_metrics(tmp_path / run)


def restore_state(workdir, epoch):
    path = os.path.join(os.path.abspath(workdir), rundir.CHECKPOINT_DIR)
    with ocp.CheckpointManager(path) as manager:
        restored = manager.restore(epoch, args=ocp.args.StandardRestore())
    return jax.tree.map(np.asarray, restored)


@pytest.mark.parametrize("rule", ["reference", "mean", "recompute"])
def test_resume_is_bitwise_equal_with_each_batchnorm_rule(tmp_path, monkeypatch, rule):
    """A model with two BatchNorm layers killed after epoch 3 and resumed from the
    checkpoint of epoch 2 ends with the same parameters and running statistics, bit for bit."""
    config = tiny_config(
        model__name=register_tiny_batchnorm_model(), train__batchnorm_statistics=rule
    )
    config.train.epochs = 3
    # recompute writes new statistics at evaluations only: evaluate every epoch, so that the
    # checkpoint the run resumes from holds recomputed statistics too.
    config.eval.every_epochs = 1 if rule == "recompute" else 3
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    resumed = killed_and_resumed(config, tmp_path / "killed", monkeypatch, dies_in_epoch=3)
    assert strip_timing([resumed]) == strip_timing([whole])
    a, b = restore_state(tmp_path / "whole", 3), restore_state(tmp_path / "killed", 3)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    initial = restore_state(tmp_path / "whole", 2)["model_state"]["batch_stats"]
    moved = jax.tree.map(
        lambda x, y: bool(np.any(x != y)), initial, a["model_state"]["batch_stats"]
    )
    assert all(jax.tree.leaves(moved)), "the running statistics should move every epoch"


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files of ``workdir``, read by
    TensorFlow."""
    import tensorflow as tf

    scalars: dict[str, list[tuple[int, float]]] = {}
    paths = sorted(Path(workdir).glob(rundir.EVENTS_PATTERN))
    assert paths, f"no event file in {workdir}"
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def assert_tensorboard_equals_metrics(workdir):
    scalars = tensorboard_scalars(workdir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in rundir.read_metrics(workdir):
        for key, value in record.items():
            if key != "epoch":
                shown = summaries.shown_value(key, value)  # accuracies in %
                expected.setdefault(summaries.tag(key), []).append((record["epoch"], shown))
    assert sorted(scalars) == sorted(expected)
    # every key a run writes has its group (gdreg.program.summaries.TAGS)
    assert not [name for name in scalars if name.startswith("other/")], sorted(scalars)
    for name, points in expected.items():
        steps = [step for step, _ in scalars[name]]
        assert steps == [step for step, _ in points], name  # each epoch once, in order
        np.testing.assert_allclose(  # TensorBoard stores float32
            [value for _, value in scalars[name]], [v for _, v in points], rtol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("penalty_state_kept", [True, False])
def test_resume_from_an_older_checkpoint_layout(tmp_path, penalty_state_kept):
    """Checkpoints from before TrainState.ema, and runs without a penalty that once saved
    penalty_state={}, resume as if uninterrupted."""
    config = tiny_config(penalty__strength=0.0)
    train.train_and_evaluate(config, str(tmp_path / "whole"))
    config.train.epochs = 2
    train.train_and_evaluate(config, str(tmp_path / "old"))
    path = tmp_path / "old" / rundir.CHECKPOINT_DIR
    with ocp.CheckpointManager(path) as manager:
        state = manager.restore(2, args=ocp.args.StandardRestore())
    shutil.rmtree(path)
    del state["ema"]
    if not penalty_state_kept:
        state["penalty_state"] = {}
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(2, args=ocp.args.StandardSave(state))
    config.train.epochs = 4
    train.train_and_evaluate(config, str(tmp_path / "old"))
    assert strip_timing(rundir.read_metrics(tmp_path / "old")) == strip_timing(
        rundir.read_metrics(tmp_path / "whole")
    )


def test_sigterm_checkpoints_and_a_rerun_finishes_the_same_run(tmp_path):
    epochs = 30
    args = (*TINY_FLAGS, "--config.data.name=synthetic", f"--config.train.epochs={epochs}")
    args = (*args, "--config.checkpoint.every_epochs=0", "--config.eval.every_epochs=0")
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        main_command(workdir, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = workdir / rundir.METRICS_FILE
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr.decode()[-3000:]
    stopped_at = len(rundir.read_metrics(workdir))
    assert 1 <= stopped_at < epochs
    assert os.listdir(workdir / "checkpoints") == [str(stopped_at)]

    result = run_main(main_command(workdir, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = run_main(main_command(tmp_path / "whole", *args))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert strip_timing(rundir.read_metrics(workdir)) == strip_timing(
        rundir.read_metrics(tmp_path / "whole")
    )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(
        optim__lr=1e4, optim__clip_norm=0.0, penalty__strength=0.0, train__epochs=20
    )
    config.checkpoint.every_epochs = 1
    with pytest.raises(train.TrainingDivergedError, match="non-finite"):
        train.train_and_evaluate(config, str(tmp_path))
    records = rundir.read_metrics(tmp_path)
    last = max(int(name) for name in os.listdir(tmp_path / "checkpoints"))
    assert last == len(records)
    params = restore_params(tmp_path, last)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_full_strength_trains_end_to_end(tmp_path):
    """penalty.full_strength > 0 reaches the engine with the full gradient (it used to raise)."""
    records = {}
    for full_strength in (0.0, 2.0):
        config = tiny_config(penalty__full_strength=full_strength, train__epochs=3)
        workdir = str(tmp_path / f"full{full_strength}")
        train.train_and_evaluate(config, workdir)
        records[full_strength] = rundir.read_metrics(workdir)
    plain, with_full = records[0.0], records[2.0]
    assert all(np.isfinite(r["train_loss"]) for r in with_full)
    # The first update is at lr 0 (warmup starts at 0), so the penalty first acts in the
    # second update, which the loss of epoch 3 shows.
    assert plain[1]["train_loss"] == with_full[1]["train_loss"]
    assert abs(plain[2]["train_loss"] - with_full[2]["train_loss"]) > 1e-4


# ----- stochastic mode ----------------------------------------------------------------------


def test_stochastic_epoch_visits_every_training_image_once():
    config = tiny_config(train__mode="stochastic", train__batch_size=16)
    run = experiment.build(config)
    for epoch in (0, 1):
        layouts = run.epoch_layouts(epoch)
        assert len(layouts) == 128 // 16 and all(layout.shape == (1, 16) for layout in layouts)
        np.testing.assert_array_equal(np.sort(np.concatenate(layouts).ravel()), np.arange(128))
    assert not np.array_equal(run.epoch_layouts(0)[0], run.epoch_layouts(1)[0])


def test_stochastic_run_trains(tmp_path):
    config = tiny_config(train__mode="stochastic", train__batch_size=32, train__epochs=3)
    train.train_and_evaluate(config, str(tmp_path))
    records = rundir.read_metrics(tmp_path)
    assert [r["images"] for r in records] == [128, 128, 128]
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_full_batch_shuffle_redraws_blocks_each_epoch():
    run = experiment.build(tiny_config(train__shuffle_blocks=True))
    first, second = run.epoch_layouts(0)[0], run.epoch_layouts(1)[0]
    assert first.shape == second.shape == (4, 32) and not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first.ravel()), np.arange(128))
    fixed = experiment.build(tiny_config())
    np.testing.assert_array_equal(fixed.epoch_layouts(0)[0], fixed.epoch_layouts(5)[0])


# ----- the paper's configs ------------------------------------------------------------------

# Geiping et al. (2022), Tables 1-2 and the authors' configs: (mode, epochs, lr, warmup, cosine
# horizon, clip, strength, block, shuffle)
PAPER_VALUES = {
    "sgd": ("stochastic", 300, 0.1, 5, 300, 0.0, 0.0, None, False),
    "fb_baseline": ("fullbatch", 300, 0.1, 5, 300, 0.0, 0.0, 128, False),
    "longer": ("fullbatch", 3000, 0.4, 400, 4000, 0.0, 0.0, 128, False),
    "clipped": ("fullbatch", 3000, 0.4, 400, 4000, 0.25, 0.0, 128, False),
    "regularized": ("fullbatch", 3000, 0.8, 400, 4000, 0.25, 0.5, 128, False),
    "strong": ("fullbatch", 3000, 0.8, 400, 4000, 0.25, 0.5, 32, False),
    "practice": ("fullbatch", 3000, 0.8, 400, 4000, 0.25, 0.5, 32, True),
}


@pytest.mark.parametrize("row", sorted(PAPER_VALUES))
def test_paper_row_configs_carry_the_reference_hyperparameters(row):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "resnet18_fb", os.path.join(REPO, "configs", "resnet18_fb.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(row)
    mode, epochs, lr, warmup, horizon, clip, strength, block, shuffle = PAPER_VALUES[row]
    assert config.model.name == "resnet18" and config.data.name == "cifar10"
    assert config.train.mode == mode and config.train.epochs == epochs
    assert config.optim.lr == lr and config.optim.warmup_epochs == warmup
    assert config.optim.cosine_epochs == horizon and config.optim.clip_norm == clip
    assert config.penalty.strength == strength and config.train.shuffle_blocks == shuffle
    assert config.penalty.eps == 1e-2 and config.penalty.method == "forward"
    assert config.optim.momentum == 0.9 and config.optim.nesterov
    assert config.optim.weight_decay == 5e-4
    if block is None:
        assert config.train.batch_size == 128
    else:
        assert config.train.block_size == block
    assert config.data.augmentation == "random"
    experiment.validate(config)


def test_fixed_dataset_rows():
    assert paper_config("resnet18", "strong_noaug").data.augmentation == "none"
    copies = paper_config("resnet18", "strong_copies")
    assert copies.data.augmentation == "fixed" and copies.data.copies == 10
    assert copies.train.block_size == 32 and copies.penalty.strength == 0.5
    assert paper_config("resnet18", "sgd_copies").train.mode == "stochastic"


# ----- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--config.model.name=resnet7", "model.name"),
        ("--config.data.name=imagenet21k", "data.name"),
        ("--config.optim.lr=-0.1", "optim.lr"),
        ("--config.train.block_size=4096", "train.block_size"),
    ],
)
def test_bad_input_ends_with_a_one_line_error_naming_the_field(tmp_path, flag, field):
    result = run_main(
        main_command(tmp_path, *TINY_FLAGS, "--config.data.name=synthetic", flag), timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and field in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_npz_with_mismatched_lengths_names_the_field(tmp_path):
    path = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 255, (10, 8, 8, 3), dtype=np.uint8),
        y_train=np.zeros(9, np.int32),
        x_test=rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8),
        y_test=np.zeros(4, np.int32),
    )
    config = tiny_config(data__name="npz", data__npz_path=str(path))
    with pytest.raises(config_lib.ConfigError, match=r"data\.npz_path") as error:
        experiment.build(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model", ["resnet50", "resnet152", "densenet121"])
def test_second_table_configs_share_the_resnet18_rows(model):
    import importlib.util

    path = os.path.join(REPO, "configs", "paper.py")
    spec = importlib.util.spec_from_file_location("paper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for row in PAPER_VALUES:
        config = module.get_config(f"{model},{row}")
        assert config.model.name == model
        expected = paper_config("resnet18", row)
        expected.model.name = model
        expected.model.width = {"densenet121": 32}.get(model, 64)  # DenseNet: growth rate 32
        assert config.to_dict() == expected.to_dict()


@pytest.mark.parametrize(
    ("script", "args"),
    [
        (
            "gdreg-train",
            ["--config=configs/resnet18_fb.py:quick", "--workdir=w", "--config.optim.lr=-1"],
        ),
        ("gdreg-report", ["no-such-run"]),
        ("gdreg-landscape", ["--workdir=no-such-run"]),
        ("gdreg-bench", ["--config=configs/resnet18_fb.py:quick", "--images=many"]),
        ("gdreg-precision", ["--workdir=no-such-run"]),
        ("gdreg-evaluate", ["--workdir=no-such-run"]),
        ("gdreg-convert-reference", ["no-such-file.pth", "--workdir=w"]),
    ],
)
def test_console_entry_points_are_the_modules(tmp_path, script, args):
    """The installed scripts run the modules: one error line, exit status 2, nothing written."""
    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{script} is not installed next to {sys.executable}"
    configs = os.path.join(REPO, "configs")
    args = [arg.replace("configs/", configs + "/") for arg in args]
    result = subprocess.run(
        [str(path), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
