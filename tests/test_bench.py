"""``python -m gdreg.tools.bench`` end to end on a tiny model, as a user runs it (no XLA flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gdreg.program import distributed

REPO = Path(__file__).resolve().parent.parent


def _bench(config: str, *flags: str) -> subprocess.CompletedProcess:
    """``python -m gdreg.tools.bench --config=configs/resnet18_fb.py:CONFIG FLAGS`` on the CPU,
    without the suite's XLA flags (as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "gdreg.tools.bench",
        f"--config=configs/resnet18_fb.py:{config}",
    ]
    return subprocess.run(
        [*command, *flags], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_bench_prints_one_line_per_dataset_size():
    result = _bench(
        "strong",
        "--config.model.name=convnet1",
        "--config.model.width=4",
        "--config.train.block_size=16",
        "--images=64,128",
        "--steps=2",
    )
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


def test_sweep_prints_every_candidate_and_times_the_fastest():
    result = _bench(
        "strong",
        "--config.model.name=convnet1",
        "--config.model.width=4",
        "--config.data.synthetic_shape=(8,8,3)",
        "--config.train.block_size=8",
        "--config.train.cpu_devices=2",
        "--images=32",
        "--config.penalty.strength=0",  # the loops, not the penalty, are timed here
        # A tiny budget: the first candidate is timed, the others may be skipped.
        "--sweep",
        "--config.train.autotune_seconds=2",
    )
    assert result.returncode == 0, result.stderr

    def fields(line):
        return dict(field.split("=", 1) for field in line.split()[1:])

    lines = result.stdout.splitlines()
    sweep = [fields(line) for line in lines if line.startswith("sweep ")]
    # 4 blocks on 2 devices: 1 block per call (Python loop or scan), or 2 (unrolled or vmapped).
    shapes = [(s["blocks_per_microbatch"], s["microbatch_loop"], s["block_loop"]) for s in sweep]
    assert shapes == [
        ("1", "python", "unroll"),
        ("1", "scan", "unroll"),
        ("2", "python", "unroll"),
        ("2", "python", "vmap"),
    ]
    timed = [s for s in sweep if "seconds_per_step" in s]
    assert timed and timed[0] is sweep[0]  # the default is timed first
    assert all(s["skipped"] == "budget_spent" for s in sweep if s not in timed)
    best = min(timed, key=lambda s: float(s["seconds_per_step"]))
    (chosen,) = [fields(line) for line in lines if line.startswith("chosen ")]
    for key in ("blocks_per_microbatch", "microbatch_loop", "block_loop"):
        assert chosen[key] == best[key]
    assert chosen["by"] == "fastest" and not any(line.startswith("model=") for line in lines)


def test_stochastic_configs_time_an_epoch_of_minibatches():
    from problems import tiny_run_config

    from gdreg.tools import bench

    config = tiny_run_config()
    config.train.mode = "stochastic"
    config.train.batch_size = 16
    config.penalty.strength = 0.0
    row = bench.bench_one(config, 64, steps=1, flops=False)
    assert row["mode"] == "stochastic" and row["batch"] == 16 and row["images"] == 64
    assert row["blocks_per_microbatch"] == 1 and row["method"] == "none" and "block" not in row
    # 4 minibatch steps per epoch of 64 images.
    # Both figures are printed rounded: the epoch to 1e-4 s, the step to 1e-6 s.
    assert abs(row["seconds_per_step"] * 4 - row["seconds_per_epoch"]) <= 0.5e-4 + 4 * 0.5e-6
    expected_rate = 64 / row["seconds_per_epoch"]
    assert abs(row["images_per_second"] - expected_rate) <= 0.01 * expected_rate


def test_an_sgd_epoch_of_hundreds_of_steps_on_two_cpu_devices_runs_through():
    """390 minibatch steps with BatchNorm's cross-device sums, queued faster than they run: with
    the queue unbounded, XLA:CPU deadlocked in a collective after some 150 steps and aborted
    the process 40 s later (train_step.CPU_STEPS_IN_FLIGHT bounds it)."""
    result = _bench(
        "sgd",
        "--config.model.name=convnet2",
        "--config.model.width=4",
        "--config.data.synthetic_shape=(8,8,3)",
        "--config.train.cpu_devices=2",
        "--images=50000",
        "--steps=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("model=")]
    row = dict(field.split("=", 1) for field in line.split())
    assert row["devices"] == "2" and row["images"] == "49920" and row["batch"] == "128"
