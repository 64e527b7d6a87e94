"""``python -m gdreg.bench`` end to end on a tiny model, as a user runs it (no XLA flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gdreg import distributed

REPO = Path(__file__).resolve().parent.parent


def test_bench_prints_one_line_per_dataset_size():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "gdreg.bench", "--config=configs/resnet18_fb.py:strong"]
    command += ["--config.model.name=convnet1", "--config.model.width=4"]
    command += ["--config.train.block_size=16", "--images=64,128", "--steps=2"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("model=")]
    rows = [dict(field.split("=", 1) for field in line.split()) for line in lines]
    assert [row["images"] for row in rows] == ["64", "128"]
    for row in rows:
        assert row["model"] == "convnet1" and row["method"] == "forward"
        # Full-batch work on CPU: one device per core unless the user chose otherwise.
        assert int(row["devices"]) == distributed.usable_cores()
        assert float(row["seconds_per_step"]) > 0
        assert float(row["compile_s"]) >= 0
        assert float(row["peak_memory_mb"]) > 0
        expected_rate = int(row["images"]) / float(row["seconds_per_step"])
        assert abs(float(row["images_per_second"]) - expected_rate) <= 0.01 * expected_rate
    # Twice the images is twice the blocks, each evaluated once: twice the FLOPs, provided
    # both sizes fill the devices evenly (4 and 8 blocks).
    if 8 % distributed.usable_cores() == 0 and 4 % distributed.usable_cores() == 0:
        ratio = float(rows[1]["tflop_per_step"]) / float(rows[0]["tflop_per_step"])
        assert abs(ratio - 2.0) < 2e-3
