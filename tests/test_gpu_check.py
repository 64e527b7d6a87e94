"""launch/gpu_check.sh in its CPU form: the checks, the figures and the table come out.

On a GPU node the same script times ResNet-18 at full width on 50,000 images
(docs/performance.md); here it runs at toy sizes so that it cannot rot between GPU slots. The
reference implementation's step is stood in for by a script that prints fixed figures, so
that the ratios are checked against numbers known in advance.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gdreg.tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_check.sh"

#: What the stand-in reference prints: 0.5 s per full-batch step, 40 images/s in SGD.
FAKE_REFERENCE = """
import sys
if "--sgd" in sys.argv:
    print("params=1 device=cpu amp=False seconds_per_epoch=1.6 images_per_second=40.0")
else:
    print("params=1 device=cpu amp=False seconds_per_step=0.5 images_per_second=128.0 peak_memory_gb=2.00")
"""


def _run(*args, env=None, timeout=600):
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        check=False,
    )


@pytest.mark.slow
def test_the_cpu_form_checks_times_and_prints_the_table(tmp_path):
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "reference_step.py").write_text(FAKE_REFERENCE)
    result = _run(
        "--dtypes=float32",
        "--steps=1",
        env={"ALLOW_CPU": "1", "PEER": str(peer), "BUDGET_SECONDS": "5"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = gpu_check.parse_fields(result.stdout)
    # On the CPU the device is the host: float32 against float64, no TF32.
    assert float(figures["check_penalty_relative_error"]) < 1e-5
    assert float(figures["check_engine_relative_error"]) < 1e-5
    seconds = float(figures["fb_float32_seconds_per_step"])
    assert seconds > 0
    assert float(figures["fb_float32_images_per_second"]) == pytest.approx(64 / seconds, rel=0.02)
    assert float(figures["sgd_float32_images_per_second"]) > 0
    assert 0 < float(figures["fb_float32_flop_fraction"]) < 1
    assert float(figures["ratio_fb_float32"]) == pytest.approx(0.5 / seconds, rel=1e-3)
    ratio_sgd = float(figures["ratio_sgd_float32"])
    assert ratio_sgd == pytest.approx(
        float(figures["sgd_float32_images_per_second"]) / 40.0, rel=1e-3
    )
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| convnet2 (width 4), 64 images, one cpu | bfloat16 | float32 |")
    assert "| reference / gdreg | n/a |" in "\n".join(table)  # bfloat16 was not asked for


def test_a_wrong_device_result_stops_before_any_timing(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "check_engine", lambda: 0.5)
    timed = []
    monkeypatch.setattr(gpu_check, "full_batch_figures", lambda *a, **k: timed.append(a) or {})
    status = gpu_check.run_check(
        gpu_check.CPU_SIZES, peer=None, budget=1.0, steps=1, dtypes=["float32"]
    )
    assert status == 1 and not timed
    assert "error: check_engine: the device's result differs from float64 by 0.5" in (
        capsys.readouterr().err
    )


def test_the_checks_see_a_wrong_penalty(monkeypatch):
    # The check is a real comparison: a penalty with half the learning rate is caught.
    real = gpu_check.penalized_gradient

    def halved(*args, learning_rate, **kwargs):
        return real(*args, learning_rate=learning_rate / 2, **kwargs)

    monkeypatch.setattr(gpu_check, "penalized_gradient", halved)
    assert gpu_check.check_penalty() == pytest.approx(0.5, rel=1e-3)


def test_help_and_bad_input():
    shown = _run("--help", timeout=30)
    assert shown.returncode == 0 and "launch/gpu_check.sh" in shown.stdout
    assert "WHEELS=DIR" in shown.stdout
    no_gpu = _run("--dtypes=float32", timeout=120)
    assert no_gpu.returncode == 2
    assert no_gpu.stderr.strip().splitlines()[-1].startswith("error: JAX sees no GPU here")
    bad_peer = _run(env={"ALLOW_CPU": "1", "PEER": "/nonexistent"}, timeout=120)
    assert bad_peer.returncode == 2
    assert bad_peer.stderr.strip().splitlines()[-1] == (
        "error: --peer /nonexistent: no reference_step.py there"
    )


def test_on_a_gpu_the_chosen_shape_is_timed_alone(monkeypatch):
    """The GPU path: the autotuner's sweep in one process, then the shape it chose in another."""
    calls = []

    def fake_run(command, env=None):
        calls.append(list(command))
        if "--sweep" in command:
            return (
                "sweep images=50000 blocks_per_microbatch=8 microbatch_loop=scan "
                "block_loop=vmap seconds_per_step=0.7 compile_s=20\n"
                "chosen images=50000 blocks_per_microbatch=8 microbatch_loop=scan "
                "block_loop=vmap by=fastest\n"
            )
        return "model=resnet18 seconds_per_step=0.8 tflop_per_step=330\n"

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    figures = gpu_check.full_batch_figures(gpu_check.GPU_SIZES, "bfloat16", 30.0, 2)
    assert figures == {"model": "resnet18", "seconds_per_step": "0.8", "tflop_per_step": "330"}
    sweep, timed = calls
    assert "--sweep" in sweep and "--config.train.autotune_seconds=30.0" in sweep
    assert "--config.train.block_size=128" in sweep and "--images=50000" in sweep
    assert "--config.model.width=64" in sweep and "--config.model.dtype=bfloat16" in sweep
    assert "--config.model.name=resnet18" in sweep
    assert timed[-4:] == [
        "--config.train.blocks_per_microbatch=8",
        "--config.train.microbatch_loop=scan",
        "--config.train.block_loop=vmap",
        "--steps=2",
    ]


def test_without_a_budget_the_default_shape_is_timed_without_a_sweep(monkeypatch):
    """BUDGET_SECONDS=0, the default: one process, the backend's own loop shape."""
    calls = []

    def fake_run(command, env=None):
        calls.append(list(command))
        return "model=resnet18 seconds_per_step=0.8 tflop_per_step=330\n"

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    figures = gpu_check.full_batch_figures(gpu_check.GPU_SIZES, "float32", None, 1)
    assert figures["seconds_per_step"] == "0.8"
    (timed,) = calls
    assert "--sweep" not in timed and timed[-1] == "--steps=1"
    assert not any(part.startswith("--config.train.block_loop") for part in timed)


def test_the_manuals_gpu_table_is_the_recorded_run():
    """docs/performance.md's H200 table holds what the recorded gpu_check run printed: every
    cell filled, each figure its line's value (FLOP fractions: 5.88 GFLOP per image, see the
    page) and the ratios the quotients of the figures beside them."""
    record = ROOT / "docs" / "measured" / "h200-2026-12-04.txt"
    lines = record.read_text().splitlines()
    figures = {}
    for line in lines:  # the figures, one name=value line each
        match = re.fullmatch(r"(\w+)=([-+]?\d*\.?\d+(?:e[-+]?\d+)?)", line)
        if match:
            figures[match[1]] = float(match[2])
    # The second command's lines (float32 reference step, both float32 SGD epochs), in order.
    reference_step, sgd, reference_sgd = (
        gpu_check.parse_fields(line) for line in lines if line.startswith(("params=", "model="))
    )
    figures["reference_fb_float32_seconds_per_step"] = float(reference_step["seconds_per_step"])
    figures["reference_fb_float32_peak_memory_gb"] = float(reference_step["peak_memory_gb"])
    figures["sgd_float32_images_per_second"] = float(sgd["images_per_second"])
    figures["reference_sgd_float32_images_per_second"] = float(reference_sgd["images_per_second"])
    page = (ROOT / "docs" / "performance.md").read_text()
    header = "| resnet18 (width 64), 50,000 images, one NVIDIA H200 |"
    table = page[page.index(header) :].split("\n\n")[0].splitlines()[2:]
    cells = {row.split("|")[1].strip(): row.split("|")[2:4] for row in table}
    assert len(cells) == 10 and "owed" not in "\n".join(table)
    for dtype, column in (("bfloat16", 0), ("float32", 1)):

        def cell(title, column=column):
            return float(cells[title][column].strip().replace(",", ""))

        seconds = figures[f"fb_{dtype}_seconds_per_step"]
        assert cell("regularized step, blocks of 128 (s)") == pytest.approx(seconds, abs=0.006)
        assert cell("images per second") == pytest.approx(49_920 / seconds, rel=2e-3)
        assert cell("peak memory (GB)") == pytest.approx(
            figures[f"fb_{dtype}_peak_memory_gb"], abs=0.006
        )
        rate = figures[f"peak_matmul_tflops_{dtype}"] * 1e12
        fraction = 49_920 * 5.88e9 / seconds / rate
        assert cell("fraction of measured peak FLOP rate") == pytest.approx(fraction, abs=0.006)
        theirs = figures[f"reference_fb_{dtype}_seconds_per_step"]
        assert cell("reference's step (s)") == pytest.approx(theirs, abs=0.006)
        assert cell("reference's peak memory (GB)") == pytest.approx(
            figures[f"reference_fb_{dtype}_peak_memory_gb"], abs=0.006
        )
        assert cell("reference / gdreg") == pytest.approx(theirs / seconds, abs=0.006)
        ours_sgd = figures[f"sgd_{dtype}_images_per_second"]
        theirs_sgd = figures[f"reference_sgd_{dtype}_images_per_second"]
        assert cell("SGD, batch 128 (images/s)") == pytest.approx(ours_sgd, rel=2e-3)
        assert cell("reference's SGD (images/s)") == pytest.approx(theirs_sgd, rel=2e-3)
        assert cell("gdreg / reference, SGD") == pytest.approx(ours_sgd / theirs_sgd, abs=0.006)
