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
    whole = next(line for line in result.stdout.splitlines() if line.startswith("whole_pass "))
    traced = float(dict(field.split("=", 1) for field in whole.split()[1:])["traced_ms"])
    kinds = [
        dict(field.split("=", 1) for field in line.split()[1:])
        for line in result.stdout.splitlines()
        if line.startswith("operations ")
    ]
    assert sum(float(kind["ms"]) for kind in kinds) == pytest.approx(traced, abs=5e-4 * len(kinds))
    assert sum(float(kind["share"]) for kind in kinds) == pytest.approx(1, abs=1e-3)
    counts = {kind["kind"]: int(kind["count"]) for kind in kinds}
    # Every 3x3 convolution runs forward at least (1x1 ones XLA may turn into products).
    assert counts["convolutions"] >= sum(layer.count for layer in layers if layer.kernel == 3)
    assert len(table) == 2 + len(rows) + 1 + 2 + len(kinds) + 1  # then the traced pass's


HLO = """HloModule jit_step

%transposing (param_0: f32[2,3]) -> f32[3,2] {
  %param_0 = f32[2,3]{1,0} parameter(0)
  %maximum.1 = f32[2,3]{1,0} maximum(%param_0, %param_0)
  ROOT %transpose.1 = f32[3,2]{0,1} transpose(%maximum.1), dimensions={1,0}
}

%adding (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%x, %y)
}

%outer (param_0.1: f32[2,3]) -> f32[3] {
  %param_0.1 = f32[2,3]{1,0} parameter(0)
  %constant.3 = f32[] constant(0)
  ROOT %reduce.4 = f32[3]{0} reduce(%param_0.1, %constant.3), dimensions={0}, to_apply=%adding
}

%inner_conv (p: f32[1,4,4,1], k: f32[3,3,1,1]) -> f32[1,4,4,1] {
  %p = f32[1,4,4,1]{3,2,1,0} parameter(0)
  %k = f32[3,3,1,1]{3,2,1,0} parameter(1)
  ROOT %convolution.5 = f32[1,4,4,1]{3,2,1,0} convolution(%p, %k), window={size=3x3}
}

%nesting (a: f32[1,4,4,1], b: f32[3,3,1,1]) -> f32[1,4,4,1] {
  %a = f32[1,4,4,1]{3,2,1,0} parameter(0)
  %b = f32[3,3,1,1]{3,2,1,0} parameter(1)
  ROOT %conv_fusion.6 = f32[1,4,4,1]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%inner_conv
}

ENTRY %main.7 (Arg_0.1: f32[2,3], Arg_1.2: f32[1,4,4,1], Arg_2.3: f32[3,3,1,1]) -> (f32[3,2], f32[3], f32[1,4,4,1], f32[2,3]) {
  %Arg_0.1 = f32[2,3]{1,0} parameter(0)
  %Arg_1.2 = f32[1,4,4,1]{3,2,1,0} parameter(1)
  %Arg_2.3 = f32[3,3,1,1]{3,2,1,0} parameter(2)
  %transpose_fusion.8 = f32[3,2]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%transposing
  %reduce_fusion.9 = f32[3]{0} fusion(%Arg_0.1), kind=kLoop, calls=%outer
  %ynn_fusion.10 = f32[1,4,4,1]{3,2,1,0} fusion(%Arg_1.2, %Arg_2.3), kind=kCustom, calls=%nesting
  %multiply.11 = f32[2,3]{1,0} multiply(%Arg_0.1, %Arg_0.1)
  ROOT %tuple.12 = (f32[3,2]{1,0}, f32[3]{0}, f32[1,4,4,1]{3,2,1,0}, f32[2,3]{1,0}) tuple(%transpose_fusion.8, %reduce_fusion.9, %ynn_fusion.10, %multiply.11)
}
"""


def test_operation_kinds_look_inside_fusions():
    """A fusion's kind is the first of OPERATION_KINDS among the operations it calls, however
    deep (a convolution in a fusion inside a fusion), and a transpose outranks the elementwise
    operations fused into it."""
    kinds = layer_profile.operation_kinds(HLO)
    assert kinds["transpose_fusion.8"] == "transposes"
    assert kinds["reduce_fusion.9"] == "reductions"
    assert kinds["ynn_fusion.10"] == "convolutions"
    assert kinds["multiply.11"] == "elementwise"
    assert kinds["convolution.5"] == "convolutions"


def test_bad_input_is_one_line():
    result = _run("--size=12")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --size 12: must be a multiple of 8 (three halvings)"
    )
