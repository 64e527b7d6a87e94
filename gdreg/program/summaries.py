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
"""

from __future__ import annotations

import glob
import json
import os
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
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        for path in glob.glob(os.path.join(glob.escape(self.logdir), "events.out.tfevents.*")):
            os.remove(path)
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)
        values = {key: _hparam_value(value) for key, value in flatten(config).items()}
        metrics = {tag(key): 0.0 for key in ("train_loss", "test_accuracy")}
        for summary in hparams(values, metrics):
            self._writer.file_writer.add_summary(summary)
        text = config.to_json_best_effort(indent=2, sort_keys=True)
        # Markdown code block: TensorBoard's text tab would otherwise reflow the JSON.
        self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))
        for record in previous:
            self.write(record)

    def write(self, record: Mapping[str, Any]) -> None:
        """Every number of ``record`` as a scalar at step ``record["epoch"]``."""
        if not self.enabled:
            return
        step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(tag(key), float(value), step)

    def close(self) -> None:
        """Flushes the events to disk (also after an error)."""
        if self.enabled:
            self._writer.close()


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
