"""gdreg.tools.layer_profile: the layer table is ResNet-18's, and the rows add up.

The profile's figures are machine timings (docs/performance.md quotes them); what a test can
hold is that the layers it times are exactly the network's, that each row's total is its
parts, and that the sum line is the sum of count x time over the rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gdreg.models import create_model
from gdreg.tools import layer_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("width", [4, 64])
def test_the_layers_are_resnet18s(width):
    """Convolution weights, two BatchNorm parameters per convolution's output channel and the
    classifier make up the model's parameter count."""
    layers = layer_profile.resnet18_layers(width, 32)
    convolutions = sum(
        layer.count * layer.kernel**2 * layer.channels_in * layer.channels_out for layer in layers
    )
    normalized = sum(layer.count * layer.channels_out for layer in layers)
    classifier = 8 * width * 10 + 10
    model = create_model("resnet18", num_classes=10, width=width)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False)
    )
    parameters = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
    assert convolutions + 2 * normalized + classifier == parameters


def _run(*flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "gdreg.tools.layer_profile", *flags],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_rows_add_up():
    result = _run("--width=2", "--images=2", "--size=8", "--repeats=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        dict(field.split("=", 1) for field in line.split())
        for line in result.stdout.splitlines()
        if line.startswith("layer=")
    ]
    layers = layer_profile.resnet18_layers(2, 8)
    assert [row["layer"] for row in rows[: len(layers)]] == [
        layer.describe().replace(" ", "_") for layer in layers
    ]
    total = sum(int(row["count"]) * float(row["gdreg_all_ms"]) for row in rows)
    totals = next(line for line in result.stdout.splitlines() if line.startswith("total "))
    fields = dict(field.split("=", 1) for field in totals.split()[1:])
    assert float(fields["gdreg_ms"]) == pytest.approx(total, abs=0.05 + 0.001 * total)
    if fields["torch_ms"] != "n/a":  # the dev extra installs torch
        theirs = sum(int(row["count"]) * float(row["torch_all_ms"]) for row in rows)
        assert float(fields["torch_ms"]) == pytest.approx(theirs, abs=0.05 + 0.001 * theirs)
        ratio = float(fields["torch_ms"]) / float(fields["gdreg_ms"])
        assert float(fields["torch_over_gdreg"]) == pytest.approx(ratio, rel=2e-3)
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| ResNet-18 width 2, 2 images of 8x8 |")
    assert len(table) == 2 + len(rows) + 1  # header, rule, a row each, the sum


def test_bad_input_is_one_line():
    result = _run("--size=12")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --size 12: must be a multiple of 8 (three halvings)"
    )
