"""docs/results.md stays true: its commands run, its tables match the code.

Every line of a ``sh`` block in the page is a command that runs here (in order, in an empty
folder, on CPU, without network) unless a ``# needs:`` comment names what it needs (a GPU,
network or SLURM). ``text`` blocks are usage synopses and examples of output.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gdreg.program import rundir, summaries

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
NEEDS = re.compile(r"#\s*needs:\s*(a GPU|GPU|network|SLURM)\b")


def blocks(language: str) -> list[str]:
    """The contents of the page's fenced blocks of ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```", PAGE.read_text(), re.MULTILINE | re.DOTALL)


def commands() -> tuple[list[str], list[str]]:
    """(commands the tests run, commands marked as needing more), in the page's order."""
    run, marked = [], []
    for block in blocks("sh"):
        for line in block.splitlines():
            if not line.strip():
                continue
            (marked if NEEDS.search(line) else run).append(line.strip())
    return run, marked


def test_every_command_is_run_here_or_says_what_it_needs():
    run, marked = commands()
    assert run and all(line.startswith("python -m gdreg.") for line in run), run
    assert marked == [
        "tensorboard --logdir runs/digits      # needs: network (pip install tensorboard)"
    ]
    # no other kind of block would hide a command
    languages = set(re.findall(r"^```(\w*)$", PAGE.read_text(), re.MULTILINE)) - {""}
    assert languages == {"sh", "text"}


def test_the_tag_table_and_the_hyperparameters_are_the_code_s():
    text = PAGE.read_text()
    rows = re.findall(r"^\| (`[a-z_*]+`.*?) \| (`[a-z_/*]+`.*?) \|$", text, re.MULTILINE)
    documented = {}
    for keys, tags in rows:
        names = re.findall(r"`([a-z_*]+)`", keys), re.findall(r"`([a-z_/*]+)`", tags)
        for key, tag in zip(*names, strict=True):
            documented[key] = tag
    assert {k: v for k, v in documented.items() if "*" not in k} == summaries.TAGS
    assert documented["reference_*"] == "reference/*" and documented["analysis_*"] == "analysis/*"
    listed = text.split("whatever their value: ")[1].split("; and every other")[0]
    assert re.findall(r"`([^`]+)`", listed) == list(summaries.IDENTIFYING_FIELDS)


@pytest.mark.slow
def test_the_commands_of_the_page_run_and_make_what_it_says(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    printed = {}
    for line in commands()[0]:
        args = shlex.split(line, comments=True)
        assert args[:2] == ["python", "-m"]
        result = subprocess.run(
            [sys.executable, *args[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        printed[args[2]] = printed.get(args[2], "") + result.stdout

    runs = tmp_path / "runs" / "digits"
    assert "test_accuracy" in printed["gdreg.main"] and "%" in printed["gdreg.main"]
    report = (runs / "report.md").read_text()
    assert "convnet2 (width 16) on 8x8 digits" in report  # the caption names model and data
    rows = [line for line in printed["gdreg.tools.report"].splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["Baseline SGD", "FB regularized"]
    assert all("| 8x8 digits |" in row for row in rows[2:])
    for name in ("curves.png", "report.csv", "report.tex"):
        assert (runs / name).is_file()
    landscape = runs / "fb_clip_reg"
    for name in ("landscape.png", "landscape.json", "landscape.csv"):
        assert (landscape / name).is_file()
    assert "test accuracy" in printed["gdreg.tools.landscape"]
    assert "relative_error_l2=" in printed["gdreg.tools.precision"]
    # TensorBoard's runs under --logdir runs/digits: named by their folders.
    folders = {str(path.parent.relative_to(runs)) for path in runs.rglob(rundir.EVENTS_PATTERN)}
    assert folders == {"sgd", "fb_clip_reg", "fb_clip_reg/pictures"}
