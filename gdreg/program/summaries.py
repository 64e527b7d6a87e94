"""TensorBoard event files of a run, written directly in ``WORKDIR``: one scalar per metric and epoch.

    tensorboard --logdir runs/        # every run below runs/, side by side, named by its folder

The events mirror ``metrics.jsonl`` (:mod:`gdreg.program.rundir`), which stays the record of truth:
every number of every record is written as a scalar at step ``epoch`` under a tag grouped by
topic (:func:`tag`): ``accuracy/`` and ``loss/`` first (TensorBoard orders groups by name),
then ``optimizer/``, ``reference/``, ``time/`` and ``analysis/``. Accuracies are shown in
percent (``metrics.jsonl`` keeps fractions). The run's configuration goes to the HPARAMS tab
(the fields that identify a run and those that differ from the defaults, :func:`hparam_fields`)
and, whole, to a text summary. On resume the run's event files are written anew from the
records that ``metrics.jsonl`` keeps, so a killed and resumed run has each epoch exactly once.

Run names: TensorBoard names a run after the folder holding its event files, relative to
``--logdir``; the events lie in the run directory itself, so ``runs/digits/sgd`` is the run
``digits/sgd``. Pictures (the loss-landscape plots, :func:`add_picture`) go to a run of their own
below it, ``WORKDIR/pictures/`` (``digits/sgd/pictures``), one image tag per kind of picture.
Runs written before this layout kept their events in ``WORKDIR/tensorboard/``; resuming such a
run moves its metrics here (the old metric events are deleted, old pictures are left).

The events are written and flushed in the training thread, in the standard event format of
tensorboardX's protocol buffers (no TensorFlow, which ``clu.metric_writers`` and
``flax.metrics.tensorboard`` need for their writers), and never stop or hang training: a write
that fails (a full disk, a file where the folder should be) is one warning, and TensorBoard is
off for the rest of the run while metrics.jsonl and the checkpoints go on; a rerun writes the
events anew. (tensorboardX's own ``SummaryWriter`` writes from a thread through a queue: when
that thread died on a full disk, training blocked on the queue forever.) Like
:mod:`gdreg.program.rundir`, this module imports no JAX.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from gdreg.program.config import RUNTIME_FIELDS, base_config, flatten, in_fields
from gdreg.program.rundir import EVENTS_PATTERN, OLD_TENSORBOARD_DIR, PICTURES_DIR

#: How a metrics.jsonl key is shown in TensorBoard (see :func:`tag` for the rest).
TAGS = {
    "train_accuracy": "accuracy/train",
    "test_accuracy": "accuracy/test",
    "test_accuracy_ema": "accuracy/test_ema",
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "test_loss_ema": "loss/test_ema",
    "penalized_loss": "loss/penalized",
    "lr": "optimizer/lr",
    "grad_norm": "optimizer/grad_norm",
    "block_grad_sq_norm": "optimizer/block_grad_sq_norm",
    "clipped": "optimizer/clipped",
    "line_search_step": "optimizer/line_search_step",
    "images": "time/images",
    "seconds": "time/seconds",
    "images_per_second": "time/images_per_second",
}
#: Groups of keys by prefix: ``analysis_grad_snr`` is ``analysis/grad_snr``.
PREFIX_GROUPS = ("analysis", "reference")
#: The fields always among the hyperparameters, whatever their value: what names a run.
IDENTIFYING_FIELDS = (
    "row",
    "seed",
    "model.name",
    "model.width",
    "data.name",
    "train.mode",
    "train.epochs",
    "optim.lr",
    "optim.clip_norm",
    "penalty.strength",
)


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: :data:`TAGS`, ``analysis_*`` under
    ``analysis/``, ``reference_*`` under ``reference/``, any other key under ``other/``."""
    for group in PREFIX_GROUPS:
        if key.startswith(group + "_"):
            return f"{group}/{key.removeprefix(group + '_')}"
    return TAGS.get(key, f"other/{key}")


def is_accuracy(key: str) -> bool:
    """Whether a metrics.jsonl key is an accuracy (a fraction there, percent when shown)."""
    return "accuracy" in key


def shown_value(key: str, value: float) -> float:
    """The value of ``key`` as TensorBoard shows it: accuracies in percent, the rest as stored."""
    return 100.0 * value if is_accuracy(key) else value


def hparam_fields(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The config fields shown in TensorBoard's HPARAMS tab, flattened (``optim.lr``).

    :data:`IDENTIFYING_FIELDS`, and every other field whose value differs from
    :func:`gdreg.program.config.base_config` and can change the result (not in
    :data:`gdreg.program.config.RUNTIME_FIELDS`). A run that leaves a field at its default has
    no value in that column: an empty cell is the default. The whole config is in the text
    summary ``config``.
    """
    defaults = flatten(base_config())
    chosen = {}
    for field, value in flatten(config).items():
        if value is None:
            continue
        differs = field not in defaults or value != defaults[field]
        if field in IDENTIFYING_FIELDS or (differs and not in_fields(field, RUNTIME_FIELDS)):
            chosen[field] = _hparam_value(value)
    return chosen


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value)


def _hparam_summaries(config: ml_collections.ConfigDict) -> list:
    """The session start and end summaries of the HPARAMS tab, without tensorboardX's
    experiment summary: TensorBoard takes the first experiment summary it finds as every
    run's list of fields, so runs that show different fields would lose theirs; without one
    it lists the union of all runs' fields, those that differ between runs first."""
    from tensorboardX.summary import hparams

    _experiment, session_start, session_end = hparams(hparam_fields(config), {})
    return [session_start, session_end]


def _remove_metric_events(workdir: str) -> None:
    """Deletes the run's metric event files (to be written anew), also those of the layout
    before :data:`gdreg.program.rundir.PICTURES_DIR` (``WORKDIR/tensorboard/``), whose
    folder goes when nothing else is in it."""
    old = os.path.join(workdir, OLD_TENSORBOARD_DIR)
    for folder in (workdir, old):
        for path in glob.glob(os.path.join(glob.escape(folder), EVENTS_PATTERN)):
            os.remove(path)
    if os.path.isdir(old) and not os.listdir(old):
        os.rmdir(old)


class TensorBoardWriter:
    """Writes metric records to event files in ``workdir`` as scalars (process 0 only).

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
        self.logdir = workdir
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
        from tensorboardX.summary import text

        _remove_metric_events(self.logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self._events = EventFile(self.logdir)
        for summary in _hparam_summaries(config):
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
                self._add(scalar(tag(key), shown_value(key, float(value))), step)

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
        """Every number of ``record`` as a scalar at step ``record["epoch"]`` (accuracies in %),
        flushed."""
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


def add_picture(workdir: str, image_tag: str, png_path: str, step: int) -> str:
    """Adds the PNG ``png_path`` to the run's TensorBoard as image ``image_tag`` at ``step``.

    Written to the run's picture run, ``workdir/pictures`` (:data:`gdreg.program.rundir.PICTURES_DIR`),
    which the metrics writer leaves alone on resume, as an event file of its own named after
    the tag and step: pictures under other tags or at other steps are kept, and a picture
    made again under the same tag and step replaces the earlier one. Returns that folder.
    """
    from matplotlib import image
    from tensorboardX import SummaryWriter

    pixels = image.imread(png_path)[..., :3]  # RGBA floats in [0, 1]: drop alpha
    logdir = os.path.join(workdir, PICTURES_DIR)
    suffix = "." + re.sub(r"[^\w.-]", "_", image_tag) + f".step{int(step)}"
    for path in glob.glob(os.path.join(glob.escape(logdir), EVENTS_PATTERN + glob.escape(suffix))):
        os.remove(path)
    with SummaryWriter(logdir=logdir, filename_suffix=suffix) as writer:
        writer.add_image(image_tag, pixels, step, dataformats="HWC")
    return logdir
