"""python -m gdreg.tools.report: the curves figure and the paper-style table of runs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from matplotlib import image as mpimg
from problems import tiny_run_config

from gdreg.program import loop as train
from gdreg.program import rundir
from gdreg.program.config import apply_row, base_config, paper_config
from gdreg.tools import report


def tiny_config(mode: str):
    config = tiny_run_config()
    config.train.mode = mode
    config.train.epochs = 3
    config.train.block_size = 64
    config.train.batch_size = 32
    config.optim.lr = 0.05
    config.optim.warmup_epochs = 1
    config.optim.cosine_epochs = 3
    config.penalty.strength = 0.0
    config.eval.every_epochs = 2
    config.checkpoint.every_epochs = 0
    config.row = "sgd" if mode == "stochastic" else ""
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for mode in ("stochastic", "fullbatch"):
        path = str(root / mode)
        train.train_and_evaluate(tiny_config(mode), path)
        dirs.append(path)
    return dirs


def parse_table(table: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in ``table`` (other lines, e.g. notes, left out)."""
    lines = [line.strip().strip("|") for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.split("|")), strict=True)) for line in lines[2:]
    ]


def test_the_report_reads_what_the_training_loop_writes(runs):
    for path in runs:
        assert [r["epoch"] for r in rundir.read_metrics(path)] == [1, 2, 3]
        assert rundir.read_config(path).to_dict() == tiny_config(os.path.basename(path)).to_dict()


def test_report_of_two_runs(runs, tmp_path, capsys):
    out = str(tmp_path / "report")
    assert report.main([*runs, "--out", out]) == 0
    printed = capsys.readouterr().out
    picture = mpimg.imread(os.path.join(out, "curves.png"))
    assert picture.shape[:2] == (750, 1000)  # 2 x 2 panels at a fixed size
    assert picture.std() > 0.05  # something was drawn
    with open(os.path.join(out, "report.md")) as handle:
        markdown = handle.read()
    assert "![training curves](curves.png)" in markdown

    rows = parse_table(printed.split("wrote")[0])
    assert [row["Row"] for row in rows] == ["Baseline SGD", "fullbatch"]  # title, dir name
    sgd, fb = rows
    # Which model and data each row trained, in the table, the caption and the figure.
    for row in rows:
        assert row["Model"] == "convnet1 (width 4)"  # not a paper model: its width is said
        assert row["Data"] == "synthetic 8x8x3, 128 images"
    assert "Warning" not in printed  # one dataset
    caption = "convnet1 (width 4) on synthetic 8x8x3, 128 images"
    assert f"against epoch, one colour per row (its seeds overlaid); {caption}." in markdown
    figure = report.curves_figure(report.group_runs([report.load_run(path) for path in runs]))
    assert figure.get_suptitle() == caption
    axes = figure.get_axes()
    assert [axis.get_ylabel() for axis in axes] == [
        "cross-entropy",
        "accuracy (%)",
        "‖mean gradient‖",
        "learning rate",
    ]
    assert [axis.get_title() for axis in axes][:2] == ["training loss", "test accuracy"]
    assert all(axis.get_xlabel().startswith("epoch") for axis in axes)
    # accuracy in % on the plot, as in the table
    (points, *_) = axes[1].get_lines()
    final = rundir.read_metrics(runs[0])[-1]["test_accuracy"]
    assert points.get_ydata()[-1] == pytest.approx(100 * final)
    assert sgd["Mini-batching"] == "yes" and fb["Mini-batching"] == "no"
    assert sgd["Epochs"] == fb["Epochs"] == "3"
    assert sgd["Steps"] == "12" and fb["Steps"] == "3"  # 128 // 32 steps per epoch
    assert sgd["Modifications"] == "clip" and fb["Modifications"] == "clip+bs64"
    for row, path in zip(rows, runs, strict=True):
        final = rundir.read_metrics(path)[-1]
        assert final["epoch"] == 3
        assert row["Test accuracy (%)"] == f"{100 * final['test_accuracy']:.2f}"
        assert row["Seeds"] == "1"
        assert row["Test accuracy (%)"] in markdown


def write_run(path, config, accuracies, epochs=None):
    """A run directory with a config and metrics written directly (no training)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as handle:
        handle.write(config.to_json_best_effort(indent=2, sort_keys=True))
    epochs = epochs or len(accuracies)
    with open(os.path.join(path, "metrics.jsonl"), "w") as handle:
        for epoch in range(1, epochs + 1):
            record = {
                "epoch": epoch,
                "train_loss": 2.0 / epoch,
                "train_accuracy": 0.5,
                "grad_norm": 1.0 / epoch,
                "lr": 0.1,
                "images": 1024,
                "clipped": 0.0,
            }
            if epoch <= len(accuracies):
                record.update(test_loss=1.0, test_accuracy=accuracies[epoch - 1])
            handle.write(json.dumps(record) + "\n")


def paper_row(row, seed, **changes):
    """The config of a paper row, 4 epochs; ``section__field=value`` changes one field."""
    config = apply_row(base_config(), row)
    config.train.epochs = 4
    config.seed = seed
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


def test_seeds_of_one_config_are_one_row_with_mean_and_std(tmp_path):
    dirs = []
    for seed, final in enumerate([0.90, 0.94, 0.95]):
        dirs.append(str(tmp_path / f"strong_{seed}"))
        write_run(dirs[-1], paper_row("strong", seed), [0.5, 0.6, 0.7, final])
    # another machine's data_dir and log settings do not split the row
    write_run(
        str(tmp_path / "strong_3"),
        paper_row("strong", 3, log__progress=False, checkpoint__every_epochs=7),
        [0.1, 0.2, 0.3, 0.93],
    )
    dirs.append(str(tmp_path / "strong_3"))
    # a different config with the same row name is its own row, named apart
    dirs.append(str(tmp_path / "strong_lr"))
    write_run(dirs[-1], paper_row("strong", 0, optim__lr=0.4), [0.2, 0.4, 0.6, 0.8])
    dirs.append(str(tmp_path / "practice"))
    write_run(dirs[-1], paper_row("practice", 0), [0.2, 0.4, 0.6, 0.85])

    result = report.write_report(dirs, str(tmp_path / "out"))
    groups = result["groups"]
    assert [len(g.runs) for g in groups] == [4, 1, 1]
    finals = [0.90, 0.94, 0.95, 0.93]
    assert groups[0].mean == pytest.approx(np.mean(finals))
    assert groups[0].std == pytest.approx(np.std(finals, ddof=1))
    rows = parse_table(result["table"])
    assert rows[0]["Row"] == "FB strong reg. (strong_0)"
    assert rows[1]["Row"] == "FB strong reg. (strong_lr)"
    assert rows[2]["Row"] == "FB in practice"
    assert rows[0]["Seeds"] == "4"
    mean, std = 100 * np.mean(finals), 100 * np.std(finals, ddof=1)
    assert rows[0]["Test accuracy (%)"] == f"{mean:.2f} ± {std:.2f}"
    assert rows[1]["Test accuracy (%)"] == "80.00"
    assert rows[0]["Modifications"] == "clip+reg+bs32"
    assert rows[2]["Modifications"] == "clip+reg+bs32+shuffle"
    assert rows[0]["Mini-batching"] == "no"
    picture = mpimg.imread(result["figure"])
    assert picture.shape[:2] == (750, 1000)


def test_unfinished_runs_and_modification_names(tmp_path):
    config = paper_row("sgd_noaug", 0)
    write_run(str(tmp_path / "a"), config, [0.3], epochs=2)  # evaluated at epoch 1 only
    fixed = paper_row("fb_copies", 0)
    write_run(str(tmp_path / "b"), fixed, [0.4, 0.5, 0.6, 0.7])
    rows = parse_table(report.write_report([str(tmp_path / "a"), str(tmp_path / "b")])["table"])
    assert rows[0]["Epochs"] == "2/4"
    assert rows[0]["Steps"] == "16"  # 1024 images // batch 128, 2 epochs
    assert rows[0]["Modifications"] == "noaug"
    assert rows[0]["Test accuracy (%)"] == "30.00"  # the last evaluation
    assert rows[1]["Modifications"] == "fixedx10"
    assert os.path.isfile(tmp_path / "report.md")  # default --out: the common parent


def test_clear_one_line_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such directory"

    write_run(str(tmp_path / "runs" / "a"), paper_row("sgd", 0), [0.5])
    assert report.main([str(tmp_path / "runs")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "no metrics.jsonl" in message and "subdirectories a are runs" in message

    os.makedirs(tmp_path / "empty")
    open(tmp_path / "empty" / "metrics.jsonl", "w").close()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no epochs recorded" in capsys.readouterr().err

    os.makedirs(tmp_path / "noconfig")
    with open(tmp_path / "noconfig" / "metrics.jsonl", "w") as handle:
        handle.write('{"epoch": 1}\n')
    assert report.main([str(tmp_path / "noconfig")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_reading_runs_needs_no_jax():
    """The report and the run directory's reader load without JAX (fast on a login node)."""
    import subprocess
    import sys

    code = "import sys, gdreg.tools.report; assert 'jax' not in sys.modules, 'jax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def fake_run(path, config, epochs, test_accuracy):
    """A run directory as training leaves it (config.json, metrics.jsonl), without training."""
    os.makedirs(path)
    rundir.write_config(str(path), config)
    writer = rundir.MetricsWriter(str(path), 0)
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "train_loss": 1.0 / epoch, "images": 49_920}
        writer.write({**record, "test_accuracy": test_accuracy} if epoch == epochs else record)
    return str(path)


def test_paper_rows_show_the_papers_numbers_and_flag_short_runs(tmp_path, capsys):
    strong = fake_run(tmp_path / "strong", paper_config("resnet18", "strong"), 3000, 0.9580)
    quick = paper_config("resnet50", "practice")
    quick.data.train_size = 1024
    quick.train.epochs = 40
    short = fake_run(tmp_path / "short", quick, 40, 0.5)
    wide = paper_config("densenet121", "sgd")
    wide.model.width = 12
    narrow = fake_run(tmp_path / "narrow", wide, 300, 0.9)
    jvp = paper_config("resnet18", "regularized")
    jvp.penalty.method = "jvp"
    exact = fake_run(tmp_path / "jvp", jvp, 3000, 0.95)
    changed = fake_run(tmp_path / "changed", paper_config("resnet18", "clipped"), 3000, 0.93)
    with open(os.path.join(changed, rundir.CONFIG_HISTORY_FILE), "w") as handle:
        handle.write("{}\n")

    runs = [strong, short, narrow, exact, changed]
    assert report.main([*runs, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    rows = parse_table(printed)
    by_label = {row["Row"]: row for row in rows}
    row = by_label["FB strong reg."]
    assert row["Test accuracy (%)"] == "95.80" and row["Paper (%)"] == "95.67 ± 0.08"
    assert row["Difference"] == "+0.13" and row["Comparable"] == "yes"
    assert row["Model"] == "resnet18" and row["Data"] == "CIFAR-10"
    # Two reasons: the first in the cell, both in note [1] below the table.
    row = by_label["FB in practice"]
    assert row["Paper (%)"] == "96.56" and row["Difference"] == "-46.56"
    assert row["Data"] == "CIFAR-10, 1,024-image subset"
    assert row["Comparable"] == "no: 1,024 of 50,000 images (+1) [1]"
    assert "[1] FB in practice: 1,024 of 50,000 images; 40 of 3,000 epochs" in printed
    assert "Warning" not in printed  # a subset of CIFAR-10 is evaluated on CIFAR-10's test set
    row = by_label["Baseline SGD"]
    assert row["Paper (%)"] == "95.84" and row["Comparable"] == "no: model.width 12 (paper 32)"
    assert row["Model"] == "densenet121 (width 12)"
    assert by_label["FB regularized"]["Comparable"] == "no: penalty.method jvp (paper forward)"
    assert by_label["FB clipped"]["Comparable"] == (
        "no: config changed during the run (config_history.jsonl)"
    )
    assert max(len(row["Comparable"]) for row in rows) <= 60
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "[1] FB in practice: 1,024 of 50,000 images; 40 of 3,000 epochs" in markdown

    # The CSV for programs: one number per cell, mean and standard deviation apart.
    with open(tmp_path / "out" / "report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(report.CSV_COLUMNS)
    by_label = {line["Row"]: line for line in table}
    line = by_label["FB strong reg."]
    assert float(line["Test accuracy (%)"]) == pytest.approx(95.80)
    assert line["Test accuracy std (%)"] == ""  # one seed
    assert float(line["Paper (%)"]) == 95.67 and float(line["Paper std (%)"]) == 0.08
    assert float(line["Difference (percentage points)"]) == pytest.approx(0.13)
    assert line["Comparable"] == "yes" and line["Not comparable because"] == ""
    assert int(line["Steps"]) == 3000 and int(line["Epochs"]) == 3000
    line = by_label["FB in practice"]
    assert line["Comparable"] == "no" and line["Paper std (%)"] == ""
    assert line["Not comparable because"] == "1,024 of 50,000 images; 40 of 3,000 epochs"
    assert int(by_label["Baseline SGD"]["Steps"]) == 300 * (49_920 // 128)
    latex = (tmp_path / "out" / "report.tex").read_text()
    assert latex.startswith("\\begin{tabular}{llllrrlrrrrl}")
    assert "95.67 $\\pm$ 0.08" in latex and "\\end{tabular}" in latex
    assert latex.count(" \\\\\n") == 1 + len(rows)
    assert "% [1] FB in practice: 1,024 of 50,000 images; 40 of 3,000 epochs" in latex


def test_runs_on_other_data_say_so(tmp_path, capsys):
    """A paper row on synthetic data is not compared with the paper (no sizes, no
    difference), and a table that mixes datasets warns, in the table and in the figure."""
    cifar = fake_run(tmp_path / "cifar", paper_config("resnet18", "strong"), 3000, 0.9580)
    synthetic = paper_config("resnet18", "strong", dataset="synthetic")
    synthetic.data.train_size = 100
    synthetic.train.epochs = 3
    small = fake_run(tmp_path / "synthetic", synthetic, 3, 0.25)
    other = fake_run(tmp_path / "other", tiny_config("fullbatch"), 3, 0.25)
    assert report.main([cifar, small, other, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    rows = {row["Row"]: row for row in parse_table(printed)}
    row = rows["FB strong reg. (synthetic)"]
    assert row["Data"] == "synthetic 32x32x3, 100 images"
    assert row["Paper (%)"] == "95.67 ± 0.08"  # the row's number, for orientation
    assert row["Difference"] == "-" and row["Comparable"] == "no: synthetic data"
    assert rows["other"]["Comparable"] == "-"  # not a model of the paper
    warning = (
        "Warning: these runs trained on 3 different datasets (CIFAR-10; synthetic 32x32x3, "
        "512 images; synthetic 8x8x3, 128 images): compare accuracies only between rows of "
        "the same Data."
    )
    assert printed.startswith(warning + "\n")
    assert f"**{warning}**" in (tmp_path / "out" / "report.md").read_text()
    result = report.write_report([cifar, small, other], str(tmp_path / "again"))
    figure = report.curves_figure(result["groups"])
    assert "3 different datasets" in figure.get_suptitle()
    labels = figure.legends[0].get_texts()
    assert [label.get_text() for label in labels] == [
        "FB strong reg. (cifar): resnet18 on CIFAR-10",
        "FB strong reg. (synthetic): resnet18 on synthetic 32x32x3, 100 images",
        "other: convnet1 (width 4) on synthetic 8x8x3, 128 images",
    ]
    with open(result["csv"], newline="") as handle:
        line = list(csv.DictReader(handle))[1]
    assert line["Not comparable because"] == "synthetic data"
    assert line["Difference (percentage points)"] == ""


def test_duplicated_epochs_are_reported(tmp_path, capsys):
    path = fake_run(tmp_path / "twice", tiny_config("fullbatch"), 3, 0.5)
    with open(os.path.join(path, rundir.METRICS_FILE), "a") as handle:
        handle.write(json.dumps({"epoch": 2, "train_loss": 1.0}) + "\n")
    assert report.main([path]) == 2
    assert "epoch 2 follows epoch 3; two runs wrote to this directory" in capsys.readouterr().err


def test_steps_follow_the_mode_of_every_epoch():
    """SGD for 2 epochs (128 images in minibatches of 32), then full batch: 4 + 4 + 1 + 1."""
    config = {"train.mode": "stochastic", "train.switch_mode_after": 2, "train.batch_size": 32}
    metrics = [{"epoch": epoch, "images": 128} for epoch in range(1, 5)]
    run = report.RunRecord("switching", config, metrics)
    assert [run.steps_until(epochs) for epochs in range(5)] == [0, 4, 8, 9, 10]
    plain = report.RunRecord("sgd", {**config, "train.switch_mode_after": 0}, metrics)
    assert plain.steps_until(3) == 12
