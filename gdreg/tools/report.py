"""Training curves and the paper's results table from finished (or running) runs.

    python -m gdreg.tools.report RUN_DIR... [--out DIR]

Reads each run directory's ``config.json`` and ``metrics.jsonl`` (:mod:`gdreg.program.rundir`) and
writes to ``--out`` (default: the run directories' common parent, or the run directory itself
for a single run):

* ``curves.png``: one 1000 x 750 px figure of four panels against epochs: training loss,
  test accuracy in % (on the evaluation epochs), gradient norm and learning rate, all runs
  overlaid, each axis labelled, titled with the model and data the runs trained (the legend
  names them when the runs differ in them). Runs that differ only in their seed share a
  colour and one legend entry.
* ``report.md``: the table in the layout of the paper's Table 1 (row, model, data,
  mini-batching, epochs, steps, modifications, final test accuracy in %) with the paper's
  accuracy for the same model and row, the difference, and whether the run is comparable
  (``yes``, else the first thing that differs, with every difference in a numbered note
  below the table), a warning when the runs are on more than one dataset, the figure with
  its caption, and which directories make up each row. The table, warning and notes are
  also printed; the table is written as ``report.tex`` (a booktabs ``tabular``, the notes
  as comments) and as ``report.csv`` for programs (numbers in cells of their own: mean and
  standard deviation apart, steps without separators, every reason in full).

Units: accuracies are in % everywhere the report shows them (``metrics.jsonl`` stores
fractions).

The paper's numbers live in ``gdreg/paper_results.json`` with their source (Tables 1 and 2
and the fixed-dataset results of Sec. 4.3).

Rows. Runs whose configs agree on every field except ``seed`` (and the fields that cannot
change the result, :data:`gdreg.program.config.RUNTIME_FIELDS`) are seeds of one row: the table
gives the mean and the sample standard deviation (n - 1) of their final test accuracies. A row is
named by its config's ``row`` (its title in :data:`gdreg.program.config.ROW_TITLES`, e.g. "FB
clipped"), or by the run directory's name when ``row`` is empty.

Modifications, from the config: ``clip`` (``optim.clip_norm`` > 0), ``reg``
(``penalty.strength`` > 0), ``fullreg`` (``penalty.full_strength`` > 0), ``bsN`` (full
batch with blocks of N other than the paper's 128, the default of ``train.block_size``),
``shuffle`` (``train.shuffle_blocks``), ``noaug`` (``data.augmentation`` none) and
``fixedxN`` (N fixed augmented copies).

Steps: one per epoch in full-batch mode; ``images // batch_size`` per epoch in stochastic
mode (each epoch in its own mode when the run switches, ``train.switch_mode_after``). For stochastic
runs the gradient norm and loss of an epoch are means over its minibatch steps (of minibatch
gradients), not full-batch quantities.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gdreg.program import exitcodes, rundir
from gdreg.program.config import (
    PAPER_TABLE,
    ROW_TITLES,
    RUNTIME_FIELDS,
    base_config,
    data_title,
    flatten,
    in_fields,
    model_title,
    paper_config,
)
from gdreg.program.rundir import RunDirError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_FILE = "curves.png"
REPORT_FILE = "report.md"
CSV_FILE = "report.csv"
LATEX_FILE = "report.tex"
#: The paper's accuracies, inside the package, with their source.
PAPER_RESULTS_FILE = "paper_results.json"
FIGURE_SIZE_PX = (1000, 750)
FIGURE_DPI = 100
# Config fields (and sections) that do not change what a run computes; runs that differ only
# in these and in the seed are seeds of one row.
NOT_GROUPED_BY = ("seed", *RUNTIME_FIELDS)
_PAPER_BLOCK_SIZE = base_config().train.block_size
#: The columns of the printed, Markdown and LaTeX table.
COLUMNS = (
    "Row",
    "Model",
    "Data",
    "Mini-batching",
    "Epochs",
    "Steps",
    "Modifications",
    "Seeds",
    "Test accuracy (%)",
    "Paper (%)",
    "Difference",
    "Comparable",
)
#: Right-aligned columns (indices into COLUMNS).
NUMERIC_COLUMNS = {4, 5, 7, 8, 9, 10}
#: The columns of report.csv: one value per cell, numbers as plain numbers ("" for none).
CSV_COLUMNS = (
    "Row",
    "Model",
    "Data",
    "Mini-batching",
    "Epochs",
    "Planned epochs",
    "Steps",
    "Modifications",
    "Seeds",
    "Test accuracy (%)",
    "Test accuracy std (%)",
    "Paper (%)",
    "Paper std (%)",
    "Difference (percentage points)",
    "Comparable",
    "Not comparable because",
)


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

    def steps_until(self, epochs: int) -> int:
        """Optimizer steps of the run's first ``epochs`` epochs: 1 per full-batch epoch,
        ``images // batch_size`` per stochastic one, each epoch in the mode the run's plan
        gives it (``train.switch_mode_after``, :mod:`gdreg.program.epochs`)."""
        first, switch = self.config["train.mode"], int(self.config["train.switch_mode_after"])
        other = "stochastic" if first == "fullbatch" else "fullbatch"
        batch_size = int(self.config["train.batch_size"])
        steps = 0
        for record in self.metrics:
            epoch = int(record["epoch"])
            if epoch > epochs:
                break
            mode = other if switch and epoch > switch else first
            steps += 1 if mode == "fullbatch" else max(1, int(record["images"]) // batch_size)
        return steps


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


def load_run(path: str) -> RunRecord:
    """Reads a run directory; :class:`gdreg.program.rundir.RunDirError` if it cannot be used."""
    metrics = rundir.read_metrics(path)
    if not os.path.isfile(os.path.join(path, rundir.CONFIG_FILE)):
        raise RunDirError(f"{path}: has {rundir.METRICS_FILE} but no {rundir.CONFIG_FILE}")
    config = flatten(rundir.read_config(path))
    return RunRecord(path=path, config=config, metrics=metrics)


def _not_grouped_by(field: str) -> bool:
    return in_fields(field, NOT_GROUPED_BY)


def _group_key(config: dict[str, Any]) -> str:
    kept = {key: value for key, value in config.items() if not _not_grouped_by(key)}
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
    if fullbatch and int(config["train.block_size"]) != _PAPER_BLOCK_SIZE:
        parts.append(f"bs{int(config['train.block_size'])}")
    if fullbatch and bool(config["train.shuffle_blocks"]):
        parts.append("shuffle")
    if config["data.augmentation"] == "none":
        parts.append("noaug")
    elif config["data.augmentation"] == "fixed":
        parts.append(f"fixedx{int(config['data.copies'])}")
    return "+".join(parts) or "-"


@functools.cache
def paper_results() -> dict[str, Any]:
    """The paper's table (``gdreg/paper_results.json``): source, dataset and accuracies."""
    text = importlib.resources.files("gdreg.tools").joinpath(PAPER_RESULTS_FILE).read_text()
    return json.loads(text)


def paper_accuracy(config: dict[str, Any]) -> tuple[float, float | None] | None:
    """(mean, standard deviation or None) in % for the config's model and row, if in the paper."""
    model = str(config["model.name"]).strip().lower()
    value = paper_results()["results"].get(model, {}).get(str(config.get("row") or ""))
    return None if value is None else (float(value[0]), value[1])


def not_comparable(
    config: dict[str, Any], epochs_done: int, *, changed_during_run: bool = False
) -> list[str]:
    """Why a run of a paper row cannot be set beside the paper's number (empty: it can).

    It must train the paper's model at the paper's width on the whole CIFAR-10 training set
    with the configuration of the row (:func:`gdreg.program.config.paper_config`, every field that
    can change the result), for exactly the row's number of epochs, and keep that configuration
    for the whole run. A run on other data is not compared further: its one reason is the data
    (e.g. ``synthetic data``).
    """
    row, model = config["row"], str(config["model.name"]).strip().lower()
    paper = paper_results()
    if config["data.name"] != paper["dataset"]:
        return [f"{config['data.name']} data"]
    reasons = []
    if int(config["data.train_size"]) != 0:
        reasons.append(f"{int(config['data.train_size']):,} of {paper['train_images']:,} images")
    planned = int(PAPER_TABLE[row].settings["train.epochs"])
    if epochs_done < planned:
        reasons.append(f"{epochs_done:,} of {planned:,} epochs")
    expected = flatten(paper_config(model, row))
    for field, value in expected.items():
        if field in _COMPARED_APART or _not_grouped_by(field):
            continue
        if field == "train.epochs" and epochs_done < planned:
            continue  # said above
        if config.get(field) != value:
            reasons.append(f"{field} {config.get(field)} (paper {value})")
    if changed_during_run:
        reasons.append(f"config changed during the run ({rundir.CONFIG_HISTORY_FILE})")
    return reasons


# Compared above (row, model, data, subset), or fields of other datasets than the paper's.
_COMPARED_APART = (
    "row",
    "model.name",
    "data.name",
    "data.train_size",
    "data.npz_path",
    "data.synthetic_shape",
    "data.synthetic_num_classes",
    "data.synthetic_train_size",
    "data.synthetic_test_size",
)


@dataclasses.dataclass
class TableRow:
    """One row of the table as numbers and words (accuracies in %); the formats below
    (:func:`display_cells`, :func:`csv_cells`) are made from it."""

    label: str
    model: str
    data: str
    dataset: str  # the data without the subset: rows of one dataset share its test set
    stochastic: bool
    epochs: int  # done by every seed
    planned_epochs: int
    steps: int
    modifications: str
    seeds: int
    accuracy: float | None  # mean over seeds, %
    accuracy_std: float | None  # sample standard deviation, %
    paper: float | None  # the paper's mean for this model and row, %
    paper_std: float | None
    comparable: bool | None  # None: not a row of the paper
    reasons: list[str]  # why not comparable
    other_data: bool  # trained on other data than the paper's: not compared at all

    @property
    def difference(self) -> float | None:
        """Ours minus the paper's, in percentage points, for runs on the paper's data."""
        if self.accuracy is None or self.paper is None or self.other_data:
            return None
        return self.accuracy - self.paper


def summarize(group: Group) -> TableRow:
    """The table row of one group of seeds."""
    config = group.config
    done = min(run.final_epoch for run in group.runs)
    paper = paper_accuracy(config)
    reasons: list[str] = []
    if paper is not None:
        reasons = not_comparable(
            config,
            done,
            changed_during_run=any(
                os.path.exists(os.path.join(run.path, rundir.CONFIG_HISTORY_FILE))
                for run in group.runs
            ),
        )
    return TableRow(
        label=group.label,
        model=model_title(config),
        data=data_title(config),
        dataset=data_title(config, subset=False),
        stochastic=config["train.mode"] == "stochastic",
        epochs=done,
        planned_epochs=int(config["train.epochs"]),
        steps=min(run.steps_until(done) for run in group.runs),
        modifications=modifications(config),
        seeds=len(group.runs),
        accuracy=None if group.mean is None else 100 * group.mean,
        accuracy_std=None if group.std is None else 100 * group.std,
        paper=None if paper is None else paper[0],
        paper_std=None if paper is None else paper[1],
        comparable=None if paper is None else not reasons,
        reasons=reasons,
        other_data=config["data.name"] != paper_results()["dataset"],
    )


def _plus_minus(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def display_cells(row: TableRow, note: int | None = None) -> list[str]:
    """The cells of ``row`` in the order of :data:`COLUMNS`; ``note`` numbers the note that
    lists every reason when there is more than one."""
    epochs = (
        f"{row.epochs}"
        if row.epochs >= row.planned_epochs
        else f"{row.epochs}/{row.planned_epochs}"
    )
    if row.comparable is None:
        paper, difference, comparable = "-", "-", "-"
    else:
        paper = _plus_minus(row.paper, row.paper_std)
        if row.difference is not None:
            difference = f"{row.difference:+.2f}"
        else:
            difference = "n/a" if row.accuracy is None and not row.other_data else "-"
        comparable = "yes" if row.comparable else f"no: {row.reasons[0]}"
        if len(row.reasons) > 1:
            comparable += f" (+{len(row.reasons) - 1}) [{note}]"
    return [
        row.label,
        row.model,
        row.data,
        "yes" if row.stochastic else "no",
        epochs,
        f"{row.steps:,}",
        row.modifications,
        str(row.seeds),
        _plus_minus(row.accuracy, row.accuracy_std),
        paper,
        difference,
        comparable,
    ]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}".rstrip("0").rstrip(".")


def csv_cells(row: TableRow) -> list[str]:
    """The cells of ``row`` in the order of :data:`CSV_COLUMNS`: one value each."""
    return [
        row.label,
        row.model,
        row.data,
        "yes" if row.stochastic else "no",
        str(row.epochs),
        str(row.planned_epochs),
        str(row.steps),
        row.modifications,
        str(row.seeds),
        _number(row.accuracy),
        _number(row.accuracy_std),
        _number(row.paper),
        _number(row.paper_std),
        _number(row.difference),
        "" if row.comparable is None else ("yes" if row.comparable else "no"),
        "; ".join(row.reasons),
    ]


def notes(rows: Sequence[TableRow]) -> list[tuple[int, str]]:
    """(number, text) of the notes below the table: every reason of the rows that are not
    comparable for more than one, numbered in the order of the rows."""
    found = []
    for row in rows:
        if len(row.reasons) > 1:
            found.append((len(found) + 1, f"{row.label}: {'; '.join(row.reasons)}"))
    return found


def table_cells(rows: Sequence[TableRow]) -> list[list[str]]:
    """The displayed cells of every row, with the note numbers of :func:`notes`."""
    cells, note = [], 0
    for row in rows:
        if len(row.reasons) > 1:
            note += 1
        cells.append(display_cells(row, note if len(row.reasons) > 1 else None))
    return cells


def dataset_warning(rows: Sequence[TableRow]) -> str | None:
    """One line when the rows trained on more than one dataset (their accuracies cannot be
    set side by side), else None."""
    datasets = list(dict.fromkeys(row.dataset for row in rows))
    if len(datasets) < 2:
        return None
    return (
        f"Warning: these runs trained on {len(datasets)} different datasets "
        f"({'; '.join(datasets)}): compare accuracies only between rows of the same Data."
    )


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """The header and ``rows`` (from :func:`table_cells`) as an aligned Markdown table."""
    rows = [list(COLUMNS), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = NUMERIC_COLUMNS

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


def write_csv(rows: Sequence[TableRow], path: str) -> None:
    """The header :data:`CSV_COLUMNS` and ``rows`` as CSV, one value per cell."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_cells(row) for row in rows)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\~{}",
    "^": r"\^{}",
    "±": r"$\pm$",
}


def latex_table(rows: Sequence[Sequence[str]], footnotes: Sequence[tuple[int, str]] = ()) -> str:
    """The header and ``rows`` (displayed cells) as a LaTeX ``tabular`` (booktabs rules),
    followed by ``footnotes`` as LaTeX comments."""

    def cell(text: str) -> str:
        return "".join(_LATEX_SPECIAL.get(char, char) for char in text)

    spec = "".join("r" if i in NUMERIC_COLUMNS else "l" for i in range(len(COLUMNS)))
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    lines.append(" & ".join(cell(name) for name in COLUMNS) + r" \\")
    lines.append("\\midrule")
    lines += [" & ".join(cell(value) for value in row) + r" \\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% [{number}] {text}" for number, text in footnotes]
    return "\n".join(lines) + "\n"


# ----- the figure ---------------------------------------------------------------------------


#: The four panels: metrics.jsonl key, title, y-axis label, scale.
PANELS = (
    ("train_loss", "training loss", "cross-entropy", "log"),
    ("test_accuracy", "test accuracy", "accuracy (%)", "linear"),
    ("grad_norm", "gradient norm, before clipping", "‖mean gradient‖", "log"),
    ("lr", "learning rate", "learning rate", "linear"),
)


def figure_caption(groups: Sequence[Group]) -> str:
    """What the curves show: the model and data of the runs (both named in the legend
    instead when the rows differ in them)."""
    combos = list(dict.fromkeys((model_title(g.config), data_title(g.config)) for g in groups))
    datasets = list(dict.fromkeys(data_title(g.config, subset=False) for g in groups))
    if len(combos) == 1:
        return f"{combos[0][0]} on {combos[0][1]}"
    if len(datasets) == 1:
        return f"on {datasets[0]}; each row's model and data in the legend"
    return (
        f"runs on {len(datasets)} different datasets (each row's in the legend): their "
        "accuracies are not comparable"
    )


def _legend_label(group: Group, name_model_and_data: bool) -> str:
    label = group.label + (f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else "")
    if name_model_and_data:
        label += f": {model_title(group.config)} on {data_title(group.config)}"
    return label


def plot_curves(groups: Sequence[Group], path: str) -> None:
    """Writes :func:`curves_figure` to the PNG ``path``."""
    curves_figure(groups).savefig(path, dpi=FIGURE_DPI)


def curves_figure(groups: Sequence[Group]) -> Figure:
    """The 2 x 2 figure (matplotlib) of training loss, test accuracy (%), gradient norm and
    learning rate against epoch, each axis labelled, titled with :func:`figure_caption`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = FIGURE_SIZE_PX
    figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).ravel()
    colours = [f"C{i}" for i in range(10)]
    combos = {(model_title(g.config), data_title(g.config)) for g in groups}
    for index, group in enumerate(groups):
        colour = colours[index % len(colours)]
        label = _legend_label(group, len(combos) > 1)
        for seed_index, run in enumerate(group.runs):
            for axis, (key, _, _, _) in zip(axes, PANELS, strict=True):
                points = [(r["epoch"], r[key]) for r in run.metrics if key in r]
                if not points:
                    continue
                epochs, values = zip(*points, strict=True)
                values = np.asarray(values, np.float64)
                if key == "test_accuracy":
                    values = 100 * values  # metrics.jsonl keeps fractions
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
    for axis, (_, title, ylabel, scale) in zip(axes, PANELS, strict=True):
        axis.set_title(title, fontsize="medium")
        axis.set_xlabel("epoch (= step in full batch)")
        axis.set_ylabel(ylabel)
        if scale == "log" and _all_positive(axis):
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    figure.suptitle(figure_caption(groups), fontsize="medium")
    handles, labels = axes[0].get_legend_handles_labels()
    columns = min(3 if len(combos) == 1 else 2, max(1, len(labels)))
    legend_rows = math.ceil(len(labels) / columns)
    bottom = 0.015 + 0.035 * legend_rows  # figure fraction kept for the legend
    if labels:
        figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small")
    figure.tight_layout(rect=(0, bottom if labels else 0, 1, 1))
    return figure


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
    """Reads the runs, writes ``curves.png``, ``report.md``, ``report.csv`` and ``report.tex``
    to ``out``; returns what it made (``table``, ``warning``, ``notes``, ``rows``, the paths)."""
    if not run_dirs:
        raise RunDirError("no run directories given")
    runs = [load_run(path) for path in run_dirs]
    groups = group_runs(runs)
    out = default_out(run_dirs) if out is None else out
    os.makedirs(out, exist_ok=True)
    figure_path = os.path.join(out, FIGURE_FILE)
    plot_curves(groups, figure_path)
    rows = [summarize(group) for group in groups]
    cells = table_cells(rows)
    footnotes = notes(rows)
    table = markdown_table(cells)
    warning = dataset_warning(rows)
    csv_path, latex_path = os.path.join(out, CSV_FILE), os.path.join(out, LATEX_FILE)
    write_csv(rows, csv_path)
    with open(latex_path, "w") as handle:
        handle.write(latex_table(cells, footnotes))
    lines = ["# Results", ""]
    if warning:
        lines += [f"**{warning}**", ""]
    lines += [table, ""]
    if footnotes:
        lines += [f"[{number}] {text}  " for number, text in footnotes]
        lines.append("")
    lines += [
        "Test accuracy: the final evaluation of each run, in %; mean ± sample standard "
        "deviation over seeds. Model: the registry name (with its width when it is not the "
        "paper's); Data: the training set. Mini-batching: yes for stochastic (SGD) training, "
        "no for full batch. Paper: the same row and model in the paper (mean ± standard "
        "deviation where it gives one); Difference: ours minus the paper's, in percentage "
        "points, for runs on the paper's data; Comparable: whether the run trained what the "
        "paper's row did, else the first thing that differs (every one in the numbered notes).",
        "",
        f"Paper's numbers: {paper_results()['source']}.",
        "",
        f"![training curves]({FIGURE_FILE})",
        "",
        f"Figure: training loss (cross-entropy), test accuracy (%), the norm of the mean "
        f"gradient before clipping and the learning rate against epoch, one colour per row "
        f"(its seeds overlaid); {figure_caption(groups)}.",
        "",
        "Runs:",
        "",
    ]
    for group in groups:
        dirs = ", ".join(
            f"`{os.path.relpath(run.path, out)}` (seed {run.config['seed']})" for run in group.runs
        )
        lines.append(
            f"- {group.label} ({model_title(group.config)} on {data_title(group.config)}): {dirs}"
        )
    report_path = os.path.join(out, REPORT_FILE)
    with open(report_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return {
        "table": table,
        "warning": warning,
        "notes": footnotes,
        "rows": rows,
        "groups": groups,
        "figure": figure_path,
        "report": report_path,
        "csv": csv_path,
        "latex": latex_path,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdreg.tools.report",
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
    except RunDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    if result["warning"]:
        print(result["warning"])
    print(result["table"])
    for number, text in result["notes"]:
        print(f"[{number}] {text}")
    print(f"wrote {result['report']}, {result['csv']}, {result['latex']} and {result['figure']}")
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-report``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
