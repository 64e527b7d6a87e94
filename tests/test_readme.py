"""The README is the front page and tells the truth: its set-up is CI's, its demo prints its
table, its paper rows are the paper's and the configs', and it links the manual.

The demo runs as the README says, into a folder of the test's own (the script takes it as its
first argument); its accuracies may differ from the README's by a few of the 360 test images
where float32 rounds otherwise (another CPU), so they are compared to within 2 points.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from docs_pages import ROOT, commands

from gdreg.program import config as config_lib

README = ROOT / "README.md"
#: XLA's FLOP count per image of ResNet-18 at width 64 on 32x32 images: one gradient (forward
#: and backward) and the regularized step's two (docs/performance.md, gdreg.tools.bench).
GFLOP_PER_GRADIENT, GFLOP_REGULARIZED = 2.94, 5.88
#: Measured on one H200 in bfloat16 (docs/performance.md, docs/measured/): the regularized
#: full-batch step over 49,920 images, and SGD at batch 128.
FULL_BATCH_SECONDS, SGD_IMAGES_PER_SECOND = 2.047, 36_110
FULL_BATCH_RATE = 49_920 * GFLOP_REGULARIZED * 1e9 / FULL_BATCH_SECONDS


def _table(text: str, header: str) -> list[dict[str, str]]:
    """The markdown table whose header row starts with ``header``, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_the_front_page_is_short_and_links_the_manual():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[\w.]+\.md)(?:#[\w-]+)?\)", text):
        assert (ROOT / link).is_file(), link
    linked = set(re.findall(r"\]\(docs/([\w.]+\.md)", text))
    assert linked == {path.name for path in (ROOT / "docs").glob("*.md")}


def test_the_set_up_commands_are_what_ci_runs():
    run, marked = commands(README)
    install, tests = run
    assert install == (
        'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && launch/digits_demo.sh'
    )
    assert tests == ".venv/bin/python -m pytest -n 2 tests"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci
    assert '.venv/bin/python -m pip install -q -e ".[dev]"' in ci
    assert re.search(r"^\.venv/bin/python -m pytest -n 2 .*tests$", ci, re.MULTILINE)
    assert all("needs: a GPU" in line for line in marked)


def test_the_paper_rows_are_the_papers_and_the_configs():
    paper = json.loads((ROOT / "gdreg" / "tools" / "paper_results.json").read_text())
    rows = _table(README.read_text(), "| variant |")
    assert [row["variant"].strip("`") for row in rows] == list(config_lib.PAPER_ROWS)
    for row in rows:
        variant = row["variant"].strip("`")
        config = config_lib.paper_config("resnet18", variant)
        assert row["paper row"] == config_lib.ROW_TITLES[variant]
        mean, std = paper["results"]["resnet18"][variant]
        assert row["ResNet-18 accuracy, paper (%)"] == f"{mean:.2f} ± {std:.2f}"
        epochs = config.train.epochs
        assert row["steps"] in (str(epochs), f"{epochs} epochs")
        block = (
            config.train.batch_size
            if config.train.mode == "stochastic"
            else (config.train.block_size)
        )
        images = 50_000 // block * block
        per_image = GFLOP_REGULARIZED if config.penalty.strength > 0 else GFLOP_PER_GRADIENT
        flop = epochs * images * per_image * 1e9
        assert float(row["compute (PFLOP)"]) == pytest.approx(flop / 1e15, rel=0.02)
        time = row["H200 time"].removesuffix(" min")
        # Measured rows carry no mark; the others are scaled from the regularized step.
        assert time.startswith("≈ ") == (variant not in ("sgd", "regularized"))
        if config.train.mode == "stochastic":
            seconds = epochs * images / SGD_IMAGES_PER_SECOND
        else:
            seconds = flop / FULL_BATCH_RATE
        assert float(time.removeprefix("≈ ")) == pytest.approx(seconds / 60, rel=0.03)


@pytest.mark.slow
def test_the_demo_prints_the_readmes_table(tmp_path):
    out = tmp_path / "digits"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["launch/digits_demo.sh", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _table(README.read_text(), "| Row | Mini-batching |")
    produced = _table((out / "report.md").read_text(), "| Row ")
    assert [row["Row"] for row in produced] == [row["Row"] for row in expected]
    for mine, theirs in zip(produced, expected, strict=True):
        for column in ("Mini-batching", "Epochs", "Steps", "Modifications"):
            assert mine[column] == theirs[column], column
        accuracy = float(mine["Test accuracy (%)"])
        assert accuracy == pytest.approx(float(theirs["Test accuracy (%)"]), abs=2.0), mine
    assert (out / "curves.png").is_file()
