"""Test loss and accuracy of a run's latest checkpoint: ``python -m gdreg.tools.evaluate
--workdir DIR``.

    python -m gdreg.tools.evaluate --workdir runs/highreg [--json]

    epoch 3000: test loss ..., test accuracy ...% on 10,000 images (cifar10; paper, FB strong reg.: 95.67 ± 0.08)

The run is rebuilt from its ``config.json`` and its newest intact checkpoint read without
moving anything (:mod:`gdreg.program.saved_run`); the test set is evaluated as training
evaluates it (:class:`gdreg.engine.evaluate.Evaluator`: eval-mode BatchNorm on the checkpoint's
statistics, every test image once, ``eval.flip_average`` as configured), and the moving
average too where the run keeps one (``eval.ema``). Where the run is one of the paper's rows
(``row`` and ``model.name``; a converted reference checkpoint is, see
:mod:`gdreg.tools.convert_reference`), the paper's accuracy for it is printed beside (from
``gdreg/tools/paper_results.json``), with what keeps the run from being comparable, as the
report says it (another data set or learning rate, fewer epochs, ...). With ``--json`` one JSON
object is printed instead.

Exit status 2 with one ``error:`` line for a run directory, config or data set that cannot be
used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from gdreg import data
from gdreg.program import distributed, exitcodes, rundir
from gdreg.program.config import ROW_TITLES, ConfigError, flatten
from gdreg.program.rundir import RunDirError
from gdreg.program.saved_run import load_checkpoint, load_run
from gdreg.tools.report import not_comparable, paper_accuracy


def evaluate_workdir(workdir: str) -> dict[str, Any]:
    """The test loss and accuracy (fractions) of ``workdir``'s latest checkpoint, with its
    epoch, data set and test-set size; ``test_loss_ema``/``test_accuracy_ema`` with
    ``eval.ema``; ``paper_accuracy`` (%, with ``paper_std``) where the paper has the row."""
    run = load_run(workdir)
    state = load_checkpoint(run, workdir)
    config = run.config
    result: dict[str, Any] = {
        "workdir": workdir,
        "epoch": int(state.epoch),
        "row": config.row,
        "model": config.model.name,
        "dataset": run.dataset.name,
        "test_images": run.dataset.num_test,
    }
    metrics = run.evaluator(state.params, state.model_state, run.test_data, run.dataset.num_test)
    result.update(test_loss=metrics["loss"], test_accuracy=metrics["accuracy"])
    if config.eval.ema:
        average = state.ema
        metrics = run.evaluator(
            average["params"], average["model_state"], run.test_data, run.dataset.num_test
        )
        result.update(test_loss_ema=metrics["loss"], test_accuracy_ema=metrics["accuracy"])
    flat = flatten(config)
    paper = paper_accuracy(flat) if config.row else None
    if paper is not None:
        result.update(paper_accuracy=paper[0], paper_std=paper[1])
        # What keeps the run from being the paper's (another lr, data set, width, ...): the
        # report's test, with the epochs of the checkpoint.
        result["not_comparable"] = not_comparable(flat, result["epoch"])
    return result


def summary_line(result: dict[str, Any]) -> str:
    """The figures of :func:`evaluate_workdir` on one line."""
    text = (
        f"epoch {result['epoch']}: test loss {result['test_loss']:.4f}, test accuracy "
        f"{100 * result['test_accuracy']:.2f}% on {result['test_images']:,} images "
        f"({result['dataset']}"
    )
    if "paper_accuracy" in result:
        title = ROW_TITLES.get(result["row"], result["row"])
        std = "" if result["paper_std"] is None else f" ± {result['paper_std']:.2f}"
        text += f"; paper, {title}: {result['paper_accuracy']:.2f}{std}"
        if result["not_comparable"]:
            text += f", not comparable: {'; '.join(result['not_comparable'])}"
    text += ")"
    if "test_accuracy_ema" in result:
        text += (
            f"; moving average: test loss {result['test_loss_ema']:.4f}, accuracy "
            f"{100 * result['test_accuracy_ema']:.2f}%"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdreg.tools.evaluate",
        description="Test loss and accuracy of a run directory's latest checkpoint.",
    )
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        requested = rundir.read_config(args.workdir).train.cpu_devices
        distributed.configure_cpu_devices(distributed.cpu_devices_for(requested, fullbatch=True))
        result = evaluate_workdir(args.workdir)
    except (RunDirError, ConfigError, data.DatasetNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    print(json.dumps(result) if args.json else summary_line(result))
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-evaluate``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
