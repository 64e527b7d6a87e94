"""Training curves and the paper's results table from finished (or running) runs.

    python -m gdreg.report RUN_DIR... [--out DIR]

Reads each run directory's ``config.json`` and ``metrics.jsonl`` (written by
:func:`gdreg.train.train_and_evaluate`) and writes to ``--out`` (default: the run
directories' common parent, or the run directory itself for a single run):

* ``curves.png``: one 1000 x 750 px figure of four panels against epochs: training loss,
  test accuracy (on the evaluation epochs), gradient norm and learning rate, all runs
  overlaid. Runs that differ only in their seed share a colour and one legend entry.
* ``report.md``: the table in the layout of the paper's Table 1 (row, mini-batching,
  epochs, steps, modifications, final test accuracy in %), the figure, and which
  directories make up each row. The table is also printed.

Rows. Runs whose configs agree on every field except ``seed`` (and fields that cannot
change the result: ``data.data_dir``, ``log``, ``checkpoint``, the block-loop knobs,
``eval.every_epochs``, ``eval.batch_size``) are seeds of one row: the table gives the mean
and the sample standard deviation (n - 1) of their final test accuracies. A row is named by
its config's ``row`` (its title in :data:`gdreg.config.ROW_TITLES`, e.g. "FB clipped"), or
by the run directory's name when ``row`` is empty.

Modifications, from the config: ``clip`` (``optim.clip_norm`` > 0), ``reg``
(``penalty.strength`` > 0), ``fullreg`` (``penalty.full_strength`` > 0), ``bsN`` (full
batch with blocks of N != 128), ``shuffle`` (``train.shuffle_blocks``), ``noaug``
(``data.augmentation`` none) and ``fixedxN`` (N fixed augmented copies).

Steps: one per epoch in full-batch mode; ``images // batch_size`` per epoch in stochastic
mode. For stochastic runs the gradient norm and loss of an epoch are means over its
minibatch steps (of minibatch gradients), not full-batch quantities.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from gdreg.config import ROW_TITLES, base_config

METRICS_FILE = "metrics.jsonl"  # as gdreg.train (not imported: it pulls in JAX and orbax)
CONFIG_FILE = "config.json"
FIGURE_FILE = "curves.png"
REPORT_FILE = "report.md"
FIGURE_SIZE_PX = (1000, 750)
FIGURE_DPI = 100
# Config fields (and sections) that do not change what a run computes; runs that differ only
# in these and in the seed are seeds of one row.
NOT_GROUPED_BY = (
    "seed",
    "data.data_dir",
    "log",
    "checkpoint",
    "train.blocks_per_microbatch",
    "train.microbatch_loop",
    "train.block_loop",
    "eval.every_epochs",
    "eval.batch_size",
)
COLUMNS = (
    "Row",
    "Mini-batching",
    "Epochs",
    "Steps",
    "Modifications",
    "Seeds",
    "Test accuracy (%)",
)


class ReportError(Exception):
    """A run directory cannot be reported on; the one-line message says why."""


@dataclasses.dataclass
class RunRecord:
    """One run directory: its flattened config and its metric records."""

    path: str
    config: dict[str, Any]  # dotted field name -> value (base_config defaults filled in)
    metrics: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def final_epoch(self) -> int:
        return int(self.metrics[-1]["epoch"])

    @property
    def final_test_accuracy(self) -> float | None:
        """Test accuracy of the last evaluation (the last epoch for a finished run)."""
        for record in reversed(self.metrics):
            if "test_accuracy" in record:
                return float(record["test_accuracy"])
        return None

    @property
    def steps_per_epoch(self) -> int:
        if self.config["train.mode"] == "fullbatch":
            return 1
        return max(1, int(self.metrics[-1]["images"]) // int(self.config["train.batch_size"]))


@dataclasses.dataclass
class Group:
    """Runs that differ only in their seed: one row of the table."""

    label: str
    runs: list[RunRecord]

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def accuracies(self) -> list[float]:
        return [a for a in (run.final_test_accuracy for run in self.runs) if a is not None]

    @property
    def mean(self) -> float | None:
        values = self.accuracies
        return float(np.mean(values)) if values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds; None for fewer than two."""
        values = self.accuracies
        return float(np.std(values, ddof=1)) if len(values) > 1 else None


# ----- reading ------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples (JSON has no tuples)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _defaults() -> dict[str, Any]:
    return flatten(json.loads(base_config().to_json_best_effort()))


def load_run(path: str) -> RunRecord:
    """Reads ``path/config.json`` and ``path/metrics.jsonl``; :class:`ReportError` if unusable."""
    if not os.path.isdir(path):
        raise ReportError(f"{path}: no such directory")
    metrics_path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        runs_below = sorted(
            entry
            for entry in os.listdir(path)
            if os.path.isfile(os.path.join(path, entry, METRICS_FILE))
        )
        hint = (
            f" (its subdirectories {', '.join(runs_below)} are runs: pass those)"
            if runs_below
            else ""
        )
        raise ReportError(f"{path}: no {METRICS_FILE}, not a training run directory{hint}")
    metrics = []
    with open(metrics_path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ReportError(f"{metrics_path} line {number}: not JSON ({error})") from None
            if not isinstance(record, dict) or "epoch" not in record:
                raise ReportError(f"{metrics_path} line {number}: not a metrics record")
            metrics.append(record)
    if not metrics:
        raise ReportError(f"{metrics_path}: no epochs recorded yet")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ReportError(f"{path}: has {METRICS_FILE} but no {CONFIG_FILE}")
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ReportError(f"{config_path}: not JSON ({error})") from None
    return RunRecord(path=path, config={**_defaults(), **flatten(config)}, metrics=metrics)


def _group_key(config: dict[str, Any]) -> str:
    kept = {
        key: value
        for key, value in config.items()
        if not any(key == skip or key.startswith(skip + ".") for skip in NOT_GROUPED_BY)
    }
    return json.dumps(kept, sort_keys=True, default=str)


def row_label(run: RunRecord) -> str:
    """The row's title (``config.row`` through ROW_TITLES), else the directory's name."""
    row = str(run.config.get("row") or "")
    if not row:
        return run.name
    return ROW_TITLES.get(row, row)


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    """Groups runs that differ only in their seed, in the order they first appear."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = _group_key(run.config)
        if key in groups:
            groups[key].runs.append(run)
        else:
            groups[key] = Group(label=row_label(run), runs=[run])
    result = list(groups.values())
    counts: dict[str, int] = {}
    for group in result:
        counts[group.label] = counts.get(group.label, 0) + 1
    for group in result:  # two different configs with the same row title: say which is which
        if counts[group.label] > 1:
            group.label = f"{group.label} ({group.runs[0].name})"
    return result


# ----- the table ----------------------------------------------------------------------------


def modifications(config: dict[str, Any]) -> str:
    """The paper's "modifications" column for one config, e.g. ``clip+reg+bs32+shuffle``."""
    parts = []
    fullbatch = config["train.mode"] == "fullbatch"
    if float(config["optim.clip_norm"]) > 0:
        parts.append("clip")
    if float(config["penalty.strength"]) > 0:
        parts.append("reg")
    if float(config.get("penalty.full_strength", 0.0)) > 0:
        parts.append("fullreg")
    if fullbatch and int(config["train.block_size"]) != 128:
        parts.append(f"bs{int(config['train.block_size'])}")
    if fullbatch and bool(config["train.shuffle_blocks"]):
        parts.append("shuffle")
    if config["data.augmentation"] == "none":
        parts.append("noaug")
    elif config["data.augmentation"] == "fixed":
        parts.append(f"fixedx{int(config['data.copies'])}")
    return "+".join(parts) or "-"


def format_accuracy(group: Group) -> str:
    if group.mean is None:
        return "n/a"
    text = f"{100 * group.mean:.2f}"
    if group.std is not None:
        text += f" ± {100 * group.std:.2f}"
    return text


def table_rows(groups: Sequence[Group]) -> list[list[str]]:
    """The cells of the table, one list per group, in the order of :data:`COLUMNS`."""
    rows = []
    for group in groups:
        config = group.config
        planned = int(config["train.epochs"])
        done = min(run.final_epoch for run in group.runs)
        epochs = f"{done}" if done >= planned else f"{done}/{planned}"
        steps = done * min(run.steps_per_epoch for run in group.runs)
        rows.append(
            [
                group.label,
                "yes" if config["train.mode"] == "stochastic" else "no",
                epochs,
                f"{steps:,}",
                modifications(config),
                str(len(group.runs)),
                format_accuracy(group),
            ]
        )
    return rows


def markdown_table(groups: Sequence[Group]) -> str:
    rows = [list(COLUMNS), *table_rows(groups)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {2, 3, 5, 6}

    def line(cells):
        padded = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (width - 1) + ":" if i in numeric else "-" * width for i, width in enumerate(widths)
    ]
    return "\n".join([line(rows[0]), line(rule), *(line(row) for row in rows[1:])])


# ----- the figure ---------------------------------------------------------------------------


def plot_curves(groups: Sequence[Group], path: str) -> None:
    """Writes the 2 x 2 figure of training loss, test accuracy, gradient norm and lr."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = FIGURE_SIZE_PX
    figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    panels = [
        (axes[0, 0], "train_loss", "training loss", "log"),
        (axes[0, 1], "test_accuracy", "test accuracy (%)", "linear"),
        (axes[1, 0], "grad_norm", "gradient norm", "log"),
        (axes[1, 1], "lr", "learning rate", "linear"),
    ]
    colours = [f"C{i}" for i in range(10)]
    for index, group in enumerate(groups):
        colour = colours[index % len(colours)]
        label = group.label + (f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else "")
        for seed_index, run in enumerate(group.runs):
            for axis, key, _, _ in panels:
                points = [(r["epoch"], r[key]) for r in run.metrics if key in r]
                if not points:
                    continue
                epochs, values = zip(*points, strict=True)
                values = np.asarray(values, np.float64)
                if key == "test_accuracy":
                    values = 100 * values
                axis.plot(
                    epochs,
                    values,
                    color=colour,
                    linewidth=1.2,
                    marker="o" if key == "test_accuracy" else None,
                    markersize=2.5,
                    alpha=0.9,
                    label=label if seed_index == 0 else None,
                )
    for axis, _key, title, scale in panels:
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if scale == "log" and _all_positive(axis):
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    columns = min(3, max(1, len(labels)))
    legend_rows = math.ceil(len(labels) / columns)
    bottom = 0.015 + 0.035 * legend_rows  # figure fraction kept for the legend
    if labels:
        figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small")
    figure.tight_layout(rect=(0, bottom if labels else 0, 1, 1))
    figure.savefig(path, dpi=FIGURE_DPI)


def _all_positive(axis) -> bool:
    ys = [np.asarray(line.get_ydata(), np.float64) for line in axis.get_lines()]
    return bool(ys) and all(y.size and np.all(y > 0) and np.all(np.isfinite(y)) for y in ys)


# ----- the program --------------------------------------------------------------------------


def default_out(run_dirs: Sequence[str]) -> str:
    """The run directories' common parent (the run directory itself for a single run)."""
    if len(run_dirs) == 1:
        return run_dirs[0]
    return os.path.commonpath([os.path.abspath(path) for path in run_dirs])


def write_report(run_dirs: Sequence[str], out: str | None = None) -> dict[str, Any]:
    """Reads the runs, writes ``curves.png`` and ``report.md`` to ``out``; returns what it made."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(path) for path in run_dirs]
    groups = group_runs(runs)
    out = default_out(run_dirs) if out is None else out
    os.makedirs(out, exist_ok=True)
    figure_path = os.path.join(out, FIGURE_FILE)
    plot_curves(groups, figure_path)
    table = markdown_table(groups)
    lines = [
        "# Results",
        "",
        table,
        "",
        "Test accuracy: the final evaluation of each run; mean ± sample standard deviation "
        "over seeds. Mini-batching: yes for stochastic (SGD) training, no for full batch.",
        "",
        f"![training curves]({FIGURE_FILE})",
        "",
        "Runs:",
        "",
    ]
    for group in groups:
        dirs = ", ".join(
            f"`{os.path.relpath(run.path, out)}` (seed {run.config['seed']})" for run in group.runs
        )
        lines.append(f"- {group.label}: {dirs}")
    report_path = os.path.join(out, REPORT_FILE)
    with open(report_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return {"table": table, "groups": groups, "figure": figure_path, "report": report_path}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdreg.report",
        description="Plots and the paper-style results table of training runs.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="workdirs of runs")
    parser.add_argument(
        "--out",
        default=None,
        help="where to write curves.png and report.md (default: the runs' common parent)",
    )
    args = parser.parse_args(argv)
    try:
        result = write_report(args.run_dirs, args.out)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"wrote {result['report']} and {result['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
