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

The writer is tensorboardX: it writes the standard event format with no TensorFlow (which
``clu.metric_writers`` and ``flax.metrics.tensorboard`` need for their TensorBoard writer),
so it installs the same way beside JAX on CPU and GPU hosts. Like :mod:`gdreg.program.rundir`, this
module imports no JAX.
"""

from __future__ import annotations

import glob
import json
import os
import re
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
    ``enabled=False`` writes nothing and creates nothing.
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
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        _remove_metric_events(workdir)
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)
        for summary in _hparam_summaries(config):
            self._writer.file_writer.add_summary(summary)
        text = config.to_json_best_effort(indent=2, sort_keys=True)
        # Markdown code block: TensorBoard's text tab would otherwise reflow the JSON.
        self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))
        for record in previous:
            self.write(record)

    def write(self, record: Mapping[str, Any]) -> None:
        """Every number of ``record`` as a scalar at step ``record["epoch"]`` (accuracies in %)."""
        if not self.enabled:
            return
        step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(tag(key), shown_value(key, float(value)), step)

    def close(self) -> None:
        """Flushes the events to disk (also after an error)."""
        if self.enabled:
            self._writer.close()


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
