"""TensorBoard events (gdreg.program.summaries) and the console progress (gdreg.program.progress)."""

from __future__ import annotations

import errno
import io
import logging
import os
import threading

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
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.25), (3, 2.0)]
    assert scalars["test/accuracy"] == [(2, 0.125)]
    assert scalars["train/clipped"] == [(1, 1.0), (3, 0.0)]

    # A resume from epoch 2: the directory is written anew from the records kept.
    writer = summaries.TensorBoardWriter(str(tmp_path), config, RECORDS[:2])
    writer.write({"epoch": 3, "train_loss": 1.5})
    writer.close()
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.25), (3, 1.5)]
    assert scalars["train/grad_norm"] == [(1, 0.75), (2, 0.5)]


def test_hyperparameters_are_recorded(tmp_path):
    import tensorflow as tf
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    config = config_lib.paper_config("resnet50", "practice")
    summaries.TensorBoardWriter(str(tmp_path), config).close()
    (path,) = (tmp_path / rundir.TENSORBOARD_DIR).glob("events.out.tfevents.*")
    hparams = {}
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
            if value.tag == "_hparams_/session_start_info":
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                hparams = dict(data.session_start_info.hparams)
    assert hparams["model.name"].string_value == "resnet50"
    assert hparams["optim.lr"].number_value == pytest.approx(0.8)
    assert hparams["train.shuffle_blocks"].bool_value is True


def test_disabled_writer_creates_nothing(tmp_path):
    writer = summaries.TensorBoardWriter(str(tmp_path), config_lib.base_config(), enabled=False)
    writer.write(RECORDS[0])
    writer.close()
    assert not (tmp_path / rundir.TENSORBOARD_DIR).exists()


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
    assert [line.split()[1] for line in lines] == ["20/40", "30/40", "40/40"]
    for line in lines:
        assert "loss 0.5000 acc 0.750 |g| 0.125 lr 0.2500 1.50s/epoch test 0.8750" in line
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
    assert tensorboard_scalars(tmp_path)["train/loss"] == [(1, 2.5)]


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
    (tmp_path / rundir.TENSORBOARD_DIR).write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        writer = summaries.TensorBoardWriter(str(tmp_path), config_lib.base_config())
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
