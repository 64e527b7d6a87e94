"""TensorBoard event files of a run: ``WORKDIR/tensorboard/``, one scalar per metric and epoch.

    tensorboard --logdir runs/        # every run below runs/, side by side

The events mirror ``metrics.jsonl`` (:mod:`gdreg.program.rundir`), which stays the record of truth:
every number of every record is written as the scalar ``<group>/<name>`` at step ``epoch``
(``train/loss``, ``train/grad_norm``, ``test/accuracy``, ``time/seconds``, ...), and the
run's configuration as TensorBoard hyperparameters (HPARAMS tab, flattened field names) and
as a text summary. On resume the run's event files are written anew from the records that
``metrics.jsonl`` keeps, so a killed and resumed run has each epoch exactly once. Pictures
(the loss-landscape plot) go to a run of their own below it, ``tensorboard/<name>/``.

The writer is tensorboardX: it writes the standard event format with no TensorFlow (which
``clu.metric_writers`` and ``flax.metrics.tensorboard`` need for their TensorBoard writer),
so it installs the same way beside JAX on CPU and GPU hosts. Like :mod:`gdreg.program.rundir`, this
module imports no JAX.

TensorBoard is a view, never a reason to stop: the events are written in the training thread,
at once, and flushed after every record (tensorboardX's ``SummaryWriter`` hands them to a
thread through a bounded queue; when that thread died on a full disk, the training thread
blocked on the queue for good, deaf to SIGTERM). Any failure to write them (a full disk, a
quota, a file where the folder should be) turns TensorBoard off for the rest of the run with
one warning; training, ``metrics.jsonl`` and the checkpoints go on, and a rerun writes the
events anew from ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from gdreg.program.config import flatten
from gdreg.program.rundir import TENSORBOARD_DIR

#: How a metrics.jsonl key is shown in TensorBoard (keys not listed keep their own name).
TAGS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "penalized_loss": "train/penalized_loss",
    "block_grad_sq_norm": "train/block_grad_sq_norm",
    "grad_norm": "train/grad_norm",
    "clipped": "train/clipped",
    "lr": "train/lr",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "images": "time/images",
    "seconds": "time/seconds",
    "images_per_second": "time/images_per_second",
}


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key (``analysis_*`` under ``analysis/``)."""
    if key.startswith("analysis_"):
        return "analysis/" + key.removeprefix("analysis_")
    return TAGS.get(key, key)


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value)


class TensorBoardWriter:
    """Writes metric records to ``workdir/tensorboard`` as scalars (process 0 only).

    ``previous`` are the records the run already has (those kept in metrics.jsonl when it
    resumes): the run's event files are deleted and these records written again, followed
    by the new ones.
    ``enabled=False`` writes nothing and creates nothing. No method raises: a failure to
    write is one warning, and the writer is off from then on (``enabled`` becomes False).
    """

    def __init__(
        self,
        workdir: str,
        config: ml_collections.ConfigDict,
        previous: Iterable[Mapping[str, Any]] = (),
        *,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self._events = None
        if not enabled:
            return
        try:
            self._open(config)
            for record in previous:
                self._write(record)
            self._events.flush()
        except Exception as error:  # whatever the cause, training goes on without TensorBoard
            self._fail(error)

    def _open(self, config: ml_collections.ConfigDict) -> None:
        from tensorboardX.summary import hparams, text

        for path in glob.glob(os.path.join(glob.escape(self.logdir), "events.out.tfevents.*")):
            os.remove(path)
        os.makedirs(self.logdir, exist_ok=True)
        self._events = EventFile(self.logdir)
        values = {key: _hparam_value(value) for key, value in flatten(config).items()}
        metrics = {tag(key): 0.0 for key in ("train_loss", "test_accuracy")}
        for summary in hparams(values, metrics):
            self._add(summary)
        config_text = config.to_json_best_effort(indent=2, sort_keys=True)
        # Markdown code block: TensorBoard's text tab would otherwise reflow the JSON.
        self._add(text("config", "\n".join("    " + line for line in config_text.splitlines())))

    def _add(self, summary: Any, step: int | None = None) -> None:
        from tensorboardX.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = step
        self._events.write(event)

    def _write(self, record: Mapping[str, Any]) -> None:
        from tensorboardX.summary import scalar

        step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self._add(scalar(tag(key), float(value)), step)

    def _fail(self, error: BaseException) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        logging.warning(
            "cannot write TensorBoard events to %s (%s): TensorBoard is off for the rest of "
            "this run; training, metrics.jsonl and the checkpoints go on, and a rerun writes "
            "the events anew from metrics.jsonl",
            self.logdir,
            " ".join(str(reason).split())[:300],
        )
        self.enabled = False
        self._close_quietly()

    def _close_quietly(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            events.close()

    def write(self, record: Mapping[str, Any]) -> None:
        """Every number of ``record`` as a scalar at step ``record["epoch"]``, flushed."""
        if not self.enabled:
            return
        try:
            self._write(record)
            self._events.flush()
        except Exception as error:
            self._fail(error)

    def close(self) -> None:
        """Flushes the events to disk and closes the file (also after an error)."""
        if not self.enabled:
            return
        try:
            self._events.flush()
        except Exception as error:
            self._fail(error)
        self._close_quietly()


class EventFile:
    """One TensorBoard event file, written in the caller's thread (TFRecord framing, as
    tensorboardX's ``RecordWriter``): ``events.out.tfevents.<time>.<host>`` in ``logdir``."""

    def __init__(self, logdir: str) -> None:
        from tensorboardX.proto import event_pb2

        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "wb")  # noqa: SIM115  (open until close())
        self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event: Any) -> None:
        """Appends ``event`` (an ``Event`` protocol buffer) to the file's buffer."""
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("Q", len(data))
        self._file.write(header + struct.pack("I", masked_crc32c(header)))
        self._file.write(data + struct.pack("I", masked_crc32c(data)))

    def flush(self) -> None:
        """Writes the buffer out (the events are then readable; no fsync: they are a view)."""
        self._file.flush()

    def close(self) -> None:
        """Closes the file; what cannot be written out then is dropped, never raised."""
        try:
            self._file.close()
        except OSError:
            # The buffer did not fit: close the descriptor under it too, so that nothing
            # retries the write (and fails again) when the object is collected.
            with contextlib.suppress(OSError):
                self._file.raw.close()


def add_picture(workdir: str, name: str, png_path: str, step: int) -> str:
    """Adds the PNG ``png_path`` to the run's TensorBoard as image ``name`` at ``step``.

    Written as its own run, ``workdir/tensorboard/<name>``, which the metrics writer leaves
    alone on resume. Returns that folder.
    """
    from matplotlib import image
    from tensorboardX import SummaryWriter

    pixels = image.imread(png_path)[..., :3]  # RGBA floats in [0, 1]: drop alpha
    logdir = os.path.join(workdir, TENSORBOARD_DIR, name)
    with SummaryWriter(logdir=logdir) as writer:
        writer.add_image(name, pixels, step, dataformats="HWC")
    return logdir
