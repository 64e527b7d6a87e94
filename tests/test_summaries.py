"""TensorBoard events (gdreg.program.summaries) and the console progress (gdreg.program.progress)."""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from test_train import tensorboard_scalars

from gdreg.program import config as config_lib
from gdreg.program import rundir, summaries
from gdreg.program.loop import progress_text
from gdreg.program.progress import ProgressBar

RECORDS = [
    {"epoch": 1, "train_loss": 2.5, "grad_norm": 0.75, "lr": 0.0, "clipped": 1.0},
    {"epoch": 2, "train_loss": 2.25, "grad_norm": 0.5, "lr": 0.4, "test_accuracy": 0.125},
    {"epoch": 3, "train_loss": 2.0, "grad_norm": 0.25, "lr": 0.8, "clipped": 0.0},
]


def test_records_become_scalars_and_a_rewrite_has_no_duplicates(tmp_path):
    config = config_lib.paper_config("resnet18", "strong")
    writer = summaries.TensorBoardWriter(str(tmp_path), config)
    for record in RECORDS:
        writer.write(record)
    writer.close()
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["loss/train"] == [(1, 2.5), (2, 2.25), (3, 2.0)]
    assert scalars["accuracy/test"] == [(2, 12.5)]  # percent, as everywhere it is shown
    assert scalars["optimizer/clipped"] == [(1, 1.0), (3, 0.0)]

    # A resume from epoch 2: the directory is written anew from the records kept.
    writer = summaries.TensorBoardWriter(str(tmp_path), config, RECORDS[:2])
    writer.write({"epoch": 3, "train_loss": 1.5})
    writer.close()
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["loss/train"] == [(1, 2.5), (2, 2.25), (3, 1.5)]
    assert scalars["optimizer/grad_norm"] == [(1, 0.75), (2, 0.5)]


# Every key a run can write to metrics.jsonl (tests/test_train.py checks those of real runs).
KEYS = [
    *RECORDS[0],
    "train_accuracy",
    "penalized_loss",
    "block_grad_sq_norm",
    "images",
    "seconds",
    "images_per_second",
    "reference_preclip_gradnorm",
    "reference_grad_norm",
    "reference_param_norm",
    "reference_full_loss",
    "line_search_step",
    "test_loss",
    "test_accuracy",
    "test_loss_ema",
    "test_accuracy_ema",
]


def test_tags_are_grouped_with_loss_and_accuracy_first():
    tags = [summaries.tag(key) for key in KEYS if key != "epoch"]
    assert all(tag.count("/") == 1 and not tag.startswith("other/") for tag in tags), tags
    assert len(set(tags)) == len(tags)
    # TensorBoard orders cards by tag (character codes, "/" and "_" before letters: Python's
    # order for these names) and groups them by the part before "/".
    groups = list(dict.fromkeys(tag.split("/")[0] for tag in sorted(tags)))
    assert groups == ["accuracy", "loss", "optimizer", "reference", "time"]
    assert sorted(t for t in tags if t.startswith("reference/")) == [
        "reference/full_loss",
        "reference/grad_norm",
        "reference/param_norm",
        "reference/preclip_gradnorm",
    ]
    assert summaries.tag("analysis_grad_snr") == "analysis/grad_snr"
    assert summaries.tag("something_new") == "other/something_new"  # grouped all the same
    accuracies = [key for key in KEYS if summaries.is_accuracy(key)]
    assert accuracies == ["train_accuracy", "test_accuracy", "test_accuracy_ema"]


def _session_start_hparams(workdir) -> tuple[dict, set[str]]:
    """The hyperparameters of the run's HPARAMS session, and every hparams tag written."""
    import tensorflow as tf
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    (path,) = Path(workdir).glob(rundir.EVENTS_PATTERN)
    hparams, tags = {}, set()
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
            if value.tag.startswith("_hparams_/"):
                tags.add(value.tag)
            if value.tag == "_hparams_/session_start_info":
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                hparams = dict(data.session_start_info.hparams)
    return hparams, tags


def test_hyperparameters_are_the_identifying_fields_and_those_changed(tmp_path):
    config = config_lib.paper_config("resnet50", "practice")
    config.log.progress = False  # changed, but changes nothing in the result
    config.checkpoint.every_epochs = 7
    config.optim.momentum = 0.8
    summaries.TensorBoardWriter(str(tmp_path), config).close()
    hparams, tags = _session_start_hparams(tmp_path)
    # No experiment summary: TensorBoard would take the first run's as every run's fields.
    assert tags == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    base = config_lib.flatten(config_lib.base_config())
    changed = {
        field
        for field, value in config_lib.flatten(config).items()
        if value != base[field] and not config_lib.in_fields(field, config_lib.RUNTIME_FIELDS)
    }
    assert changed == {
        "row",
        "model.name",
        "train.block_size",
        "train.shuffle_blocks",
        "optim.momentum",
    }
    assert set(hparams) == set(summaries.IDENTIFYING_FIELDS) | changed
    assert hparams["model.name"].string_value == "resnet50"
    assert hparams["optim.lr"].number_value == pytest.approx(0.8)
    assert hparams["optim.momentum"].number_value == pytest.approx(0.8)
    assert hparams["train.shuffle_blocks"].bool_value is True
    assert hparams["train.mode"].string_value == "fullbatch"  # identifying, at its default
    assert "log.progress" not in hparams and "checkpoint.every_epochs" not in hparams


def _run_names(logdir) -> set[str]:
    """The runs TensorBoard shows for ``--logdir logdir``: every folder that holds event
    files, named by its path relative to ``logdir``."""
    return {
        str(path.parent.relative_to(logdir)) for path in Path(logdir).rglob("events.out.tfevents.*")
    }


def _picture(path) -> str:
    from matplotlib import image

    image.imsave(str(path), np.linspace(0, 1, 12 * 16).reshape(12, 16), cmap="viridis")
    return str(path)


def test_runs_are_named_by_their_directory_and_pictures_keep_their_tags(tmp_path):
    config = config_lib.base_config()
    for name in ("a", "b"):
        writer = summaries.TensorBoardWriter(str(tmp_path / "runs" / name), config)
        writer.write(RECORDS[0])
        writer.close()
    picture = _picture(tmp_path / "p.png")
    workdir = str(tmp_path / "runs" / "a")
    for tag in ("landscape/1d_span1_points21_seed0", "landscape/2d_span1_points21_seed0"):
        summaries.add_picture(workdir, tag, picture, step=3)
    assert _run_names(tmp_path / "runs") == {"a", "b", "a/pictures"}
    images = _images(tmp_path / "runs" / "a" / rundir.PICTURES_DIR)
    assert sorted(images) == [
        ("landscape/1d_span1_points21_seed0", 3, 12, 16),
        ("landscape/2d_span1_points21_seed0", 3, 12, 16),
    ]
    # The same picture made again replaces the first; at another epoch it is a new step.
    summaries.add_picture(workdir, "landscape/1d_span1_points21_seed0", picture, step=3)
    summaries.add_picture(workdir, "landscape/1d_span1_points21_seed0", picture, step=5)
    images = _images(tmp_path / "runs" / "a" / rundir.PICTURES_DIR)
    assert sorted(images) == [
        ("landscape/1d_span1_points21_seed0", 3, 12, 16),
        ("landscape/1d_span1_points21_seed0", 5, 12, 16),
        ("landscape/2d_span1_points21_seed0", 3, 12, 16),
    ]
    # A resume rewrites the metrics and leaves the pictures.
    summaries.TensorBoardWriter(workdir, config, RECORDS[:1]).close()
    assert len(_images(tmp_path / "runs" / "a" / rundir.PICTURES_DIR)) == 3
    assert tensorboard_scalars(workdir)["loss/train"] == [(1, 2.5)]


def _images(folder) -> list[tuple[str, int, int, int]]:
    import tensorflow as tf

    return [
        (value.tag, event.step, value.image.height, value.image.width)
        for path in sorted(Path(folder).glob(rundir.EVENTS_PATTERN))
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
        if value.HasField("image")
    ]


def test_a_run_of_the_old_layout_resumes_into_the_new_one(tmp_path):
    """Runs written before the events moved to WORKDIR kept them in WORKDIR/tensorboard/ (and
    pictures in WORKDIR/tensorboard/landscape/): a resume writes the metrics anew in WORKDIR,
    deletes the old metric events, and leaves the old pictures."""
    config = config_lib.base_config()
    old = tmp_path / rundir.OLD_TENSORBOARD_DIR
    writer = summaries.TensorBoardWriter(str(old), config)  # events as the old layout had them
    writer.write(RECORDS[0])
    writer.close()
    summaries.add_picture(str(old), "landscape", _picture(tmp_path / "p.png"), step=1)
    (old / rundir.PICTURES_DIR).rename(old / "landscape")
    summaries.TensorBoardWriter(str(tmp_path), config, RECORDS[:2]).close()
    assert _run_names(tmp_path) == {".", "tensorboard/landscape"}
    assert tensorboard_scalars(tmp_path)["loss/train"] == [(1, 2.5), (2, 2.25)]
    # Without old pictures the old folder goes.
    shutil.rmtree(old / "landscape")
    writer = summaries.TensorBoardWriter(str(old), config)
    writer.close()
    summaries.TensorBoardWriter(str(tmp_path), config, RECORDS[:2]).close()
    assert not old.exists()


def test_disabled_writer_creates_nothing(tmp_path):
    writer = summaries.TensorBoardWriter(
        str(tmp_path / "run"), config_lib.base_config(), enabled=False
    )
    writer.write(RECORDS[0])
    writer.close()
    assert not (tmp_path / "run").exists()


def test_progress_in_a_log_file_is_plain_lines_with_the_figures():
    stream = io.StringIO()  # not a terminal, like SLURM's output file
    bar = ProgressBar(40, start=10, lines=3, stream=stream)
    record = {"train_loss": 0.5, "train_accuracy": 0.75, "grad_norm": 0.125, "lr": 0.25}
    for done in range(11, 41):
        bar.update(done, progress_text({**record, "seconds": 1.5}, test_accuracy=0.875))
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "step 10/40 compiling (the first one takes longer)"
    lines = lines[1:]
    assert [line.split()[1] for line in lines] == ["20/40", "30/40", "40/40"]
    for line in lines:
        assert "loss 0.5000 acc 75.0% lr 0.25 test 87.5%" in line
        assert " elapsed 0:00:00 left " in line
    assert lines[-1].endswith("left 0:00:00")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_tqdm_bar():
    stream = _Terminal()
    bar = ProgressBar(4, stream=stream)
    for done in range(1, 5):
        bar.update(done, f"loss {done}")
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "4/4" in text and "loss 4" in text
    assert "compiling (the first one takes longer)" in text


def test_the_bar_and_its_figures_fit_80_columns():
    stream = _Terminal()
    bar = ProgressBar(3000, start=2990, stream=stream, unit="step")
    record = {"train_loss": 2.30258, "train_accuracy": 0.123, "lr": 0.7993, "seconds": 1.5}
    for done in range(2991, 3001):
        bar.update(done, progress_text(record, test_accuracy=0.9567))
    bar.close()
    shown = [part.rstrip() for part in stream.getvalue().replace("\n", "\r").split("\r")]
    assert shown[-2].startswith("3000/3000 steps [")
    assert shown[-2].endswith(", loss 2.3026 acc 12.3% lr 0.7993 test 95.7%]")
    assert max(len(part) for part in shown) <= 80


def test_quiet_when_disabled():
    stream = io.StringIO()
    bar = ProgressBar(4, stream=stream, enabled=False)
    bar.update(4, "loss 1")
    bar.close()
    assert stream.getvalue() == ""


def test_events_are_written_in_the_callers_thread(tmp_path):
    """tensorboardX's SummaryWriter queues events for a thread of its own; when that thread
    died (a full disk), training blocked on the queue for good. This writer starts none."""
    before = threading.active_count()
    writer = summaries.TensorBoardWriter(str(tmp_path), config_lib.base_config())
    writer.write(RECORDS[0])
    assert threading.active_count() == before
    writer.close()
    assert tensorboard_scalars(tmp_path)["loss/train"] == [(1, 2.5)]


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_event_write_turns_tensorboard_off_with_one_warning(tmp_path, caplog):
    writer = summaries.TensorBoardWriter(str(tmp_path), config_lib.base_config())
    writer._events._file = io.BufferedWriter(_FullDisk())  # the disk fills up
    with caplog.at_level(logging.WARNING):
        for record in RECORDS:
            writer.write(record)  # never raises
        writer.close()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert "TensorBoard is off for the rest of this run" in warnings[0]
    assert not writer.enabled


def test_a_tensorboard_folder_that_cannot_be_made_turns_tensorboard_off(tmp_path, caplog):
    where = tmp_path / "run"
    where.write_text("a file where the run's folder should be")
    with caplog.at_level(logging.WARNING):
        writer = summaries.TensorBoardWriter(str(where), config_lib.base_config())
        writer.write(RECORDS[0])
        writer.close()
    assert not writer.enabled
    assert sum("cannot write TensorBoard events" in r.getMessage() for r in caplog.records) == 1


class _BrokenConsole(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_progress_that_cannot_be_written_goes_quiet_with_one_warning(caplog):
    bar = ProgressBar(4, lines=4, stream=_BrokenConsole())
    with caplog.at_level(logging.WARNING):
        for done in range(1, 5):
            bar.update(done, "loss 1")  # never raises
        bar.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot write the progress" in warnings[0]
