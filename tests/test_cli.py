"""The front door of every program: ``--help`` answers and exits 0, a mistake is one line.

Each command runs as a user types it, from a directory other than the checkout where that
matters (config paths are relative to the current directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = str(ROOT / "configs" / "resnet18_fb.py")


def _run(command, cwd, timeout=120):
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ([str(BIN / "gdreg-train")], ["--config", "--workdir", "--allow_config_change"]),
        ([sys.executable, "-m", "gdreg.main"], ["--config", "--workdir", "--process_id"]),
        ([str(BIN / "gdreg-bench")], ["--config", "--images", "--sweep", "--steps"]),
        ([str(BIN / "gdreg-precision")], ["--config", "--workdir"]),
        ([sys.executable, "-m", "gdreg.tools.gpu_check"], ["--allow_cpu", "--peer"]),
        ([str(BIN / "gdreg-report")], ["--out"]),
        ([str(BIN / "gdreg-landscape")], ["--workdir", "--directions", "--test"]),
    ],
)
def test_help_lists_the_flags_and_exits_0(tmp_path, command, flags):
    result = _run([*command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in flags:
        assert flag in result.stdout, flag
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "script", ["digits_demo.sh", "paper_table.sh", "single_node.sh", "slurm.sbatch", "gpu_check.sh"]
)
def test_launch_scripts_answer_help_and_start_nothing(tmp_path, script):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho started >> " + str(tmp_path / "started") + "\n")
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for flag in ("--help", "-h"):
        result = subprocess.run(
            ["bash", str(ROOT / "launch" / script), flag],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert script in result.stdout  # its usage line names it
        assert not result.stdout.lstrip().startswith("#")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["python"]


def test_a_wrong_config_group_is_named_with_the_groups(tmp_path):
    result = _run(
        [
            sys.executable,
            "-m",
            "gdreg.main",
            f"--config={CONFIG}:quick",
            "--workdir=run",
            "--config.optimizer.lr=0.1",
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --config.optimizer.lr: no config group 'optimizer'; the groups are analysis, "
        "checkpoint, data, eval, log, loss, model, optim, penalty, train"
    ]
    assert not (tmp_path / "run").exists()


def test_a_relative_config_path_from_elsewhere_names_the_path_it_tried(tmp_path):
    result = _run(
        [
            sys.executable,
            "-m",
            "gdreg.main",
            "--config=configs/resnet18_fb.py:quick",
            "--workdir=run",
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --config: no such file {tmp_path}/configs/resnet18_fb.py; a config path is "
        f"relative to the current directory ({tmp_path})"
    ]
    assert not (tmp_path / "run").exists()
