"""The training loss around a checkpoint along random filter-normalized directions.

    python -m gdreg.tools.landscape --workdir RUN_DIR [--directions 1|2] [--points 21]
                              [--span 1.0] [--seed 0] [--test] [--out DIR]

Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets"
(NeurIPS 2018): draw a Gaussian direction d with the shape of the parameters theta and
rescale it filter by filter, d_f <- d_f * ||theta_f|| / ||d_f||, so that a step of length 1
changes every filter by as much as the filter's own norm. Here a *filter* is everything
that feeds one output channel of a convolution or one output unit of a dense layer: the
slices along the last axis of a Flax kernel (``[kh, kw, in, out]`` or ``[in, out]``). As in
Li et al.'s code (its ``ignore="biasbn"`` option), the direction is zero on biases and
BatchNorm scales and offsets (every parameter with fewer than two axes): they stay at the
checkpoint's values.

The loss is evaluated at ``theta + a * d1`` (1D) or ``theta + a * d1 + b * d2`` (2D) for
``a, b`` in ``linspace(-span, span, points)``, plus the checkpoint itself. It is the
quantity the training log reports as ``train_loss``/``train_accuracy``: the mean
cross-entropy (no weight decay, no penalty) and accuracy over the training blocks in
training mode (BatchNorm on each block's statistics), computed by the same sharded
:class:`gdreg.engine.fullbatch.FullBatchGradient` as training (its ``forward_only`` form), on the
block layout and the augmentation draws of the epoch that follows the checkpoint
(:func:`gdreg.program.experiment.epoch_layouts`; for stochastic runs the epoch's minibatches are the
blocks). Only the forward pass runs. At distance 0 the value is the ``train_loss`` that the
next epoch logs (up to float rounding). With ``--test`` the test loss and accuracy
(evaluation mode) are computed at every point too.

Writes ``landscape.json`` (grid, values and settings), ``landscape.csv`` (one row per
point; accuracies as fractions, like ``metrics.jsonl``) and ``landscape.png`` (loss and
accuracy in % along the line for 1D; loss contours for 2D, the training loss beside the test
loss with ``--test``; titled with the run, its model and data, and which loss) to ``--out``
(default: the run directory), and the picture to the run's TensorBoard: the run's picture
run ``WORKDIR/pictures`` at the checkpoint's epoch, under a tag of its settings
(:func:`picture_tag`, e.g. ``landscape/2d_span1_points21_seed0_test``), so that calls with
other settings keep their own pictures.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from gdreg.engine.directions import random_direction
from gdreg.engine.mesh import fetch_replicated, replicate
from gdreg.program import distributed, exitcodes, rundir, summaries
from gdreg.program.config import ROW_TITLES, data_title, flatten, model_title
from gdreg.program.progress import ProgressBar
from gdreg.program.rundir import RunDirError
from gdreg.program.saved_run import load_checkpoint, load_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTPUT_NAME = "landscape"
FIGURE_SIZE_PX = (900, 600)
#: 2D with --test: the training and the test loss side by side.
TWO_PANEL_SIZE_PX = (1400, 600)
FIGURE_DPI = 100
NORMALIZATION = (
    "filter-wise (Li et al. 2018): each output channel/unit of a kernel rescaled to the norm "
    "of the matching parameter filter; zero on biases and BatchNorm parameters"
)


# ----- evaluation -----------------------------------------------------------------------------


def check_grid(directions: int, points: int, span: float) -> None:
    """Raises ``ValueError`` naming the first bad grid setting (they are command-line flags)."""
    if directions not in (1, 2):
        raise ValueError(f"--directions must be 1 or 2, got {directions}")
    if points < directions:
        raise ValueError(
            f"--points must be at least {directions} for {directions} direction(s), got {points}"
        )
    if not span > 0:
        raise ValueError(f"--span must be positive, got {span}")


def compute_landscape(
    workdir: str,
    *,
    directions: int = 1,
    points: int = 21,
    span: float = 1.0,
    seed: int = 0,
    test: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Loads the run in ``workdir`` and evaluates the loss on the grid; returns the results."""
    check_grid(directions, points, span)
    run = load_run(workdir)
    config = run.config
    state = load_checkpoint(run, workdir)
    epoch = int(state.epoch)
    params = state.params
    layout = run.epoch_blocks(epoch)
    engine = run.engine.forward_only()

    dirs = [random_direction(params, seed, index) for index in range(directions)]
    params_dev = replicate(params, run.mesh)
    dirs_dev = replicate(dirs, run.mesh)
    model_state = replicate(state.model_state, run.mesh)

    @jax.jit
    def moved(params, dirs, coefficients):
        def leaf(p, *ds):
            return p + sum(c * d for c, d in zip(coefficients, ds, strict=True))

        return jax.tree.map(leaf, params, *dirs)

    def evaluate(coefficients) -> dict[str, float]:
        at = moved(params_dev, dirs_dev, np.asarray(coefficients, np.float32))
        metrics = fetch_replicated(
            engine(at, model_state, None, run.train_data, layout, epoch).metrics
        )
        values = {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"])}
        if test:
            result = run.evaluator(at, model_state, run.test_data, run.dataset.num_test)
            values.update(test_loss=result["loss"], test_accuracy=result["accuracy"])
        return values

    axis = np.linspace(-span, span, points) if points > 1 else np.zeros(1)
    axis = np.asarray([float(f"{a:.12g}") for a in axis])  # -0.4, not -0.399999999999999
    grid = [(a,) for a in axis] if directions == 1 else [(a, b) for a in axis for b in axis]
    began = time.perf_counter()
    center = evaluate((0.0,) * directions)
    bar = ProgressBar(len(grid), enabled=progress, unit="point")
    values = []
    for done, coefficients in enumerate(grid, 1):
        values.append(evaluate(coefficients))
        bar.update(done, f"loss {values[-1]['loss']:.4f}")
    bar.close()
    seconds = time.perf_counter() - began

    shape = (points,) * directions
    result: dict[str, Any] = {
        "workdir": os.path.abspath(workdir),
        "epoch": epoch,
        "row": config.row,
        "model": model_title(flatten(config)),
        "data": data_title(flatten(config)),
        "directions": directions,
        "points": points,
        "span": span,
        "seed": seed,
        "normalization": NORMALIZATION,
        "quantity": "mean training cross-entropy and accuracy over the blocks, training mode",
        "layout": {
            "mode": config.train.mode,
            "blocks": int(layout.shape[0]),
            "block_size": int(layout.shape[1]),
            "images": int(layout.size),
            "step": epoch,
        },
        "alpha": axis.tolist(),
        "center": center,
        "seconds": seconds,
    }
    if directions == 2:
        result["beta"] = axis.tolist()
    for key in values[0]:
        result[key] = np.asarray([v[key] for v in values]).reshape(shape).tolist()
    result["grid"] = [[float(c) for c in coefficients] for coefficients in grid]
    return result


# ----- output ---------------------------------------------------------------------------------


def write_outputs(result: dict[str, Any], out: str) -> dict[str, str]:
    """Writes landscape.json, landscape.csv and landscape.png to ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"{OUTPUT_NAME}.{ext}") for ext in ("json", "csv", "png")}
    with open(paths["json"], "w") as handle:
        json.dump({k: v for k, v in result.items() if k != "grid"}, handle, indent=1)
    keys = [k for k in ("loss", "accuracy", "test_loss", "test_accuracy") if k in result]
    names = ["alpha", "beta"][: result["directions"]]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names + keys)
        flat = {k: np.ravel(result[k]) for k in keys}
        for index, coefficients in enumerate(result["grid"]):
            writer.writerow(
                [f"{c:.6g}" for c in coefficients] + [f"{flat[k][index]:.8g}" for k in keys]
            )
    plot_landscape(result, paths["png"])
    return paths


def picture_tag(result: dict[str, Any]) -> str:
    """The TensorBoard image tag of a landscape: its settings, e.g.
    ``landscape/1d_span1_points21_seed0`` (``_test`` with the test set)."""
    name = (
        f"{OUTPUT_NAME}/{result['directions']}d_span{result['span']:g}"
        f"_points{result['points']}_seed{result['seed']}"
    )
    return name + ("_test" if "test_loss" in result else "")


def figure_title(result: dict[str, Any]) -> str:
    """The picture's title: run, epoch, which loss, and the run's model and data."""
    row = result["row"]
    name = ROW_TITLES.get(row, row) if row else os.path.basename(result["workdir"])
    which = "training and test loss" if "test_loss" in result else "training loss"
    along = "a filter-normalized direction" if result["directions"] == 1 else "two directions"
    title = f"{name}, epoch {result['epoch']}: {which} along {along}"
    if "model" in result:  # landscape.json files of older versions lack them
        title += f"\n{result['model']} on {result['data']}"
    return title


def plot_landscape(result: dict[str, Any], path: str) -> None:
    """Writes :func:`landscape_figure` to the PNG ``path``."""
    landscape_figure(result).savefig(path, dpi=FIGURE_DPI)


def landscape_figure(result: dict[str, Any]) -> Figure:
    """The picture (matplotlib) of ``result`` (from :func:`compute_landscape`): loss and
    accuracy (%) along the line for 1D; loss contours for 2D, training and test side by side
    when the test set was evaluated; titled with :func:`figure_title`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    two_panels = result["directions"] == 2 and "test_loss" in result
    width, height = TWO_PANEL_SIZE_PX if two_panels else FIGURE_SIZE_PX
    figure = Figure(
        figsize=(width / FIGURE_DPI, height / FIGURE_DPI),
        dpi=FIGURE_DPI,
        # contours keep their aspect ratio: the constrained layout fits them, titles and labels
        layout="constrained" if result["directions"] == 2 else None,
    )
    FigureCanvasAgg(figure)
    figure.suptitle(figure_title(result), fontsize="medium")
    alpha = np.asarray(result["alpha"])
    loss = np.asarray(result["loss"], np.float64)
    if result["directions"] == 1:
        axis = figure.subplots()
        axis.plot(alpha, loss, color="C0", marker="o", markersize=3, label="training loss")
        if "test_loss" in result:
            axis.plot(alpha, result["test_loss"], color="C0", linestyle="--", label="test loss")
        curves = [loss, np.asarray(result.get("test_loss", loss), np.float64)]
        if all(_positive(values) for values in curves):
            axis.set_yscale("log")
        axis.set_xlabel("distance along the direction (filter-normalized units)")
        axis.set_ylabel("loss (cross-entropy)", color="C0")
        accuracy_axis = axis.twinx()
        accuracy_axis.plot(
            alpha, 100 * np.asarray(result["accuracy"]), color="C1", label="training accuracy"
        )
        if "test_accuracy" in result:
            accuracy_axis.plot(
                alpha,
                100 * np.asarray(result["test_accuracy"]),
                color="C1",
                linestyle="--",
                label="test accuracy",
            )
        accuracy_axis.set_ylabel("accuracy (%)", color="C1")
        accuracy_axis.set_ylim(0, 100)
        lines = axis.get_lines() + accuracy_axis.get_lines()
        figure.legend(
            lines, [line.get_label() for line in lines], loc="lower center", ncol=len(lines)
        )
        axis.grid(True, alpha=0.3)
        figure.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        panels = [("training loss", loss)]
        if two_panels:
            panels.append(("test loss", np.asarray(result["test_loss"], np.float64)))
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        beta = np.asarray(result["beta"])
        for axis, (which, values) in zip(axes, panels, strict=True):
            _contours(figure, axis, alpha, beta, values, which)
    return figure


def _positive(values: np.ndarray) -> bool:
    return bool(np.all(values > 0) and np.all(np.isfinite(values)))


def _contours(figure, axis, alpha: np.ndarray, beta: np.ndarray, values: np.ndarray, which: str):
    """Filled contours of ``values`` (``values[i][j]`` at ``(alpha[i], beta[j])``), log-scaled
    when positive, with a colour bar naming ``which`` loss; a star at the checkpoint."""
    from matplotlib.colors import LogNorm

    xs, ys = np.meshgrid(alpha, beta, indexing="ij")  # alpha on the x axis
    log_scale = _positive(values) and values.max() > values.min()
    if log_scale:
        levels = np.geomspace(values.min(), values.max(), 25)
        filled = axis.contourf(xs, ys, values, levels=levels, norm=LogNorm(), cmap="viridis")
        axis.contour(xs, ys, values, levels=levels[::3], colors="white", linewidths=0.6)
    else:
        filled = axis.contourf(xs, ys, values, levels=25, cmap="viridis")
    label = f"{which} (log scale)" if log_scale else which
    colorbar = figure.colorbar(filled, ax=axis, label=label)
    if log_scale:
        ticks = _log_ticks(values.min(), values.max())
        colorbar.set_ticks(ticks, labels=[f"{tick:g}" for tick in ticks])
        colorbar.minorticks_off()
    axis.plot([0], [0], marker="*", color="red", markersize=12, linestyle="none")
    axis.set_title(which)
    axis.set_xlabel("direction 1 (filter-normalized units)")
    axis.set_ylabel("direction 2 (filter-normalized units)")
    axis.set_aspect("equal")


def _log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks per decade between ``low`` and ``high`` (both > 0)."""
    ticks = [
        mantissa * 10.0**exponent
        for exponent in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
        for mantissa in (1, 2, 5)
    ]
    return [tick for tick in ticks if low <= tick <= high]


# ----- the program ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdreg.tools.landscape",
        description="Training loss around a run's latest checkpoint along random "
        "filter-normalized directions (Li et al., NeurIPS 2018).",
    )
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--directions", type=int, choices=(1, 2), default=1)
    parser.add_argument("--points", type=int, default=21, help="grid points per direction")
    parser.add_argument("--span", type=float, default=1.0, help="grid from -span to +span")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--test", action="store_true", help="also evaluate the test set")
    parser.add_argument("--out", default=None, help="output directory (default: --workdir)")
    args = parser.parse_args(argv)
    try:
        check_grid(args.directions, args.points, args.span)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    try:
        requested = rundir.read_config(args.workdir).train.cpu_devices
        # A scan evaluates the whole training set block by block, also for a stochastic run.
        distributed.configure_cpu_devices(distributed.cpu_devices_for(requested, fullbatch=True))
        result = compute_landscape(
            args.workdir,
            directions=args.directions,
            points=args.points,
            span=args.span,
            seed=args.seed,
            test=args.test,
        )
        paths = write_outputs(result, args.out or args.workdir)
        try:
            summaries.add_picture(args.workdir, picture_tag(result), paths["png"], result["epoch"])
        except OSError as error:  # e.g. a run directory the user may only read
            logging.warning("the plot was not added to the run's TensorBoard: %s", error)
    except RunDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    loss = np.asarray(result["loss"])
    print(
        f"epoch {result['epoch']}: training loss {result['center']['loss']:.4f} at the "
        f"checkpoint, {loss.min():.4f} to {loss.max():.4f} on the grid "
        f"({loss.size} points, {result['seconds']:.1f}s)"
    )
    if args.test:
        center = result["center"]
        print(
            f"test loss {center['test_loss']:.4f} and test accuracy "
            f"{100 * center['test_accuracy']:.2f}% at the checkpoint"
        )
    print("wrote " + ", ".join(paths.values()))
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-landscape``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
