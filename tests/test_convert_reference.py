"""gdreg.tools.convert_reference: the authors' checkpoints as gdreg runs, logit for logit.

A PyTorch ResNet with the reference's ``state_dict`` layout (tests/reference_torch.py; with
``AUTHORS_DIR`` pointing at the authors' code, their own class as well) gets random weights,
BatchNorm statistics and momentum buffers, is saved as their training loop saves it
(``[optimizer, model, scheduler, scaler, step]``), converted, and gdreg's eval-mode logits on the
same images are compared with PyTorch's: to 1e-5 in float32, to 1e-10 in float64 (the
variables cast to float64, as gdreg.tools.precision computes in float64). The ResNet-18 is the
published one (width 64); the ResNet-152 runs the same bottleneck code path at width 4.

PyTorch comes with the "torch" extra (and "dev"); without it these tests are skipped, except
those of the names and of the one-line error that names the extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdreg.engine.mesh import data_mesh
from gdreg.models import reference_names
from gdreg.program import checkpoint, experiment, rundir
from gdreg.program.config import paper_config
from gdreg.tools import convert_reference

REPO = Path(__file__).resolve().parents[1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH,
    reason="PyTorch is not installed: it comes with the 'torch' extra and with 'dev' "
    "(pip install -e '.[dev]')",
)
needs_authors = pytest.mark.skipif(
    not os.environ.get("AUTHORS_DIR"),
    reason="AUTHORS_DIR (the folder holding the authors' fullbatch package) is not set",
)
# XLA:CPU's fast compile options (as tests/test_model_counts.py): the ResNet-152's forward pass
# compiles in seconds instead of half a minute.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
IMAGE = 8  # pixels: every stage keeps at least one (8 -> 4 -> 2 -> 1)


def torch_modules():
    import reference_torch
    import torch

    torch.set_num_threads(1)
    return torch, reference_torch


def tiny_data(config):
    """``config`` on a small synthetic set of 8x8 images (TFDS cannot download here)."""
    config.data.name = "synthetic"
    config.data.synthetic_shape = (IMAGE, IMAGE, 3)
    config.data.synthetic_train_size = 64
    config.data.synthetic_test_size = 32
    config.data.padding = 1
    config.eval.batch_size = 32
    config.log.progress = False
    return config


def make_file(tmp_path, depth=18, width=4, *, authors=False, edit=None, schedule_lr=True):
    """A reference model with random weights saved as their training loop saves it; returns
    the torch model, its optimizer and the file. ``edit(state_dict)`` changes the model state
    before saving."""
    torch, reference_torch = torch_modules()
    torch.manual_seed(depth + width)
    if authors:
        model = reference_torch.authors_resnet(depth, width)
    else:
        model = reference_torch.TorchResNet(depth, width)
    optimizer = reference_torch.randomize(model, image_size=IMAGE)
    if schedule_lr:  # what their scheduler leaves in the group after 3000 steps of the row
        config = paper_config(f"resnet{depth}", "strong")
        schedule = experiment.make_optimizer(config, _plan(config)).schedule
        optimizer.param_groups[0].update(lr=float(schedule(3000)), initial_lr=config.optim.lr)
    path = str(tmp_path / f"resnet{depth}_w{width}.pth")
    if edit is None:
        reference_torch.save_published(model, optimizer, path)
    else:
        state = model.state_dict()
        edit(state)
        torch.save([optimizer.state_dict(), state, {}, None, 3000], path)
    return model, optimizer, path


def _plan(config):
    from gdreg.program.epochs import epoch_plan

    return epoch_plan(config, 1, 1)


def config_for(depth, width, row="strong"):
    config = tiny_data(paper_config(f"resnet{depth}", row))
    config.model.width = width
    return config


def restore(workdir, conversion):
    """The checkpoint of ``workdir`` read back by gdreg's reader, shaped like the conversion's."""
    manager = checkpoint.checkpoint_manager(workdir, 1)
    try:
        state = checkpoint.restore_latest(
            manager, conversion.state, data_mesh(), move_damaged=False
        )
    finally:
        manager.close()
    return jax.tree.map(np.asarray, state)


def logits(config, variables, images, dtype):
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    model = experiment.make_model(config, 10)
    variables = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), variables)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(forward.lower(variables, images).compile(FAST)(variables, images))


# ----- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model", "row", "lr", "block_size", "shuffle"),
    [
        ("final_fbaug_highreg_lr08_resnet18", "resnet18", "strong", 0.8, 32, False),
        ("final_fbaug_gradreg_lr08_resnet18", "resnet18", "regularized", 0.8, 128, False),
        ("final_fbaug_gradreg_lr16_resnet18", "resnet18", "regularized", 1.6, 128, False),
        ("final_fbaug_clip_lr04_resnet18", "resnet18", "clipped", 0.4, 128, False),
        ("final_fbaug_highreg_lr08_shuffle_resnet152", "resnet152", "practice", 0.8, 32, True),
    ],
)
def test_published_names_give_their_paper_rows(name, model, row, lr, block_size, shuffle):
    config = convert_reference.default_config(f"downloads/{name}.pth", None, None)
    assert (config.model.name, config.row, config.model.width) == (model, row, 64)
    assert (config.optim.lr, config.train.block_size) == (lr, block_size)
    assert config.train.shuffle_blocks is shuffle
    assert config.train.epochs == 3000 and config.data.name == "cifar10"
    assert config.optim.clip_norm == 0.25
    assert config.penalty.strength == (0.0 if row == "clipped" else 0.5)
    # --row overrides the name's row, and then the published run's other settings are left out
    other = convert_reference.default_config(f"{name}.pth", None, "longer")
    assert (other.row, other.optim.lr) == ("longer", 0.4)


def test_another_name_needs_the_row_and_model():
    with pytest.raises(convert_reference.ConversionError, match="--model and --row"):
        convert_reference.default_config("mine.pth", None, None)
    config = convert_reference.default_config("mine.pth", "resnet152", "practice")
    assert (config.model.name, config.row) == ("resnet152", "practice")


def test_without_torch_the_error_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "final_fbaug_highreg_lr08_resnet18.pth"
    path.write_bytes(b"not read")
    monkeypatch.setattr(convert_reference, "torch_available", lambda: False)
    with pytest.raises(convert_reference.ConversionError) as error:
        convert_reference.read_reference_file(str(path))
    assert 'pip install "gdreg[torch]"' in str(error.value)


# ----- logits ------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize(
    ("depth", "width", "authors"),
    [
        (18, 64, False),
        (152, 4, False),
        pytest.param(18, 64, True, marks=needs_authors),
        pytest.param(152, 4, True, marks=needs_authors),
    ],
    ids=["resnet18", "resnet152-width4", "authors-resnet18", "authors-resnet152-width4"],
)
def test_converted_logits_equal_torch(tmp_path, depth, width, authors):
    torch, reference_torch = torch_modules()
    model, optimizer, path = make_file(tmp_path, depth, width, authors=authors)
    reference = convert_reference.read_reference_file(path)
    assert reference.layout == "tuple" and reference.step == 3000
    config = config_for(depth, width)
    conversion = convert_reference.convert(reference, config)
    assert conversion.warnings == []
    workdir = str(tmp_path / "run")
    convert_reference.write_run(conversion, workdir)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "run"])
    state = restore(workdir, conversion)
    variables = {"params": state.params, **state.model_state}

    images = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want32 = model(images).numpy()
        want64 = model.double()(images.double()).numpy()
    got32 = logits(config, variables, reference_torch.nhwc(images), "float32")
    with jax.enable_x64(True):
        got64 = logits(config, variables, reference_torch.nhwc(images.double()), "float64")
    assert 0.1 < np.abs(want32).max() < 100  # logits of a sensible size, not all alike
    np.testing.assert_allclose(got32, want32, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got64, want64, rtol=0, atol=1e-10)

    # The rest of the state: the epoch and step counts of the file, the BatchNorm statistics
    # and the momentum buffers in gdreg's layout.
    assert int(state.epoch) == 3000
    from optax import tree_utils

    assert int(tree_utils.tree_get(state.opt_state, "count")) == 3000
    assert int(tree_utils.tree_get(state.penalty_state, "count")) == 3000
    trace = tree_utils.tree_get(state.opt_state, "trace")
    torch_params = [p for _, p in model.named_parameters()]
    named = dict(zip([n for n, _ in model.named_parameters()], torch_params, strict=True))
    expected = reference_names.expected_keys(variables)
    for key, (path_, _) in expected.items():
        tensor = model.state_dict()[key].float().numpy()
        if path_[0] == "params":
            buffer = optimizer.state[named[key]]["momentum_buffer"].float().numpy()
            leaf = trace
            for part in path_[1:]:
                leaf = leaf[part]
            np.testing.assert_array_equal(leaf, reference_names.to_gdreg_layout(buffer))
            tree = state.params
        else:
            tree = state.model_state["batch_stats"]
        for part in path_[1:]:
            tree = tree[part]
        np.testing.assert_array_equal(tree, reference_names.to_gdreg_layout(tensor))
    assert conversion.record["sha256"] and conversion.record["layout"].startswith("checkpoint list")
    record = json.loads((Path(workdir) / rundir.CONVERSION_FILE).read_text())
    assert record["epoch"] == 3000 and record["momentum"].startswith("from the file")
    assert len(record["ignored"]["num_batches_tracked"]) == record["batchnorm_statistics"] // 2


@needs_torch
@needs_authors
def test_the_test_model_has_the_authors_keys_shapes_and_order():
    _, reference_torch = torch_modules()
    for depth, width in ((18, 64), (152, 4)):
        ours = reference_torch.TorchResNet(depth, width).state_dict()
        theirs = reference_torch.authors_resnet(depth, width).state_dict()
        assert [(k, tuple(v.shape)) for k, v in ours.items()] == [
            (k, tuple(v.shape)) for k, v in theirs.items()
        ]


@needs_torch
@pytest.mark.parametrize("authors", [False, pytest.param(True, marks=needs_authors)])
@pytest.mark.parametrize(("depth", "width"), [(18, 64), (152, 4)])
def test_parameter_order_is_the_models(depth, width, authors):
    """The order that numbers a torch optimizer's state follows from gdreg's model alone."""
    _, reference_torch = torch_modules()
    build = reference_torch.authors_resnet if authors else reference_torch.TorchResNet
    names = [name for name, _ in build(depth, width).named_parameters()]
    model = experiment.make_model(config_for(depth, width), 10)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False)
    )
    assert reference_names.parameter_order(reference_names.expected_keys(shapes)) == names


# ----- what does not fit ---------------------------------------------------------------------


def _unknown(state):
    state["layers.0.0.extra.weight"] = state["layers.0.0.conv1.weight"].clone()


def _missing(state):
    del state["layers.3.1.bn2.running_var"]


def _shape(state):
    state["layers.1.0.conv1.weight"] = state["layers.1.0.conv1.weight"][:, :2].clone()


@needs_torch
@pytest.mark.parametrize(
    ("edit", "key", "words"),
    [
        (_unknown, "layers.0.0.extra.weight", "unknown key"),
        (_missing, "layers.3.1.bn2.running_var", "missing"),
        (_shape, "layers.1.0.conv1.weight", "shape (8, 2, 3, 3), gdreg's model needs (8, 4, 3, 3)"),
    ],
    ids=["unknown-key", "missing-key", "wrong-shape"],
)
def test_a_tensor_that_does_not_fit_is_named(tmp_path, edit, key, words):
    _, _, path = make_file(tmp_path, 18, 4, edit=edit)
    reference = convert_reference.read_reference_file(path)
    with pytest.raises(convert_reference.ConversionError) as error:
        convert_reference.convert(reference, config_for(18, 4))
    message = str(error.value)
    assert f"{key}: " in message and words in message, message
    assert "\n" not in message


@needs_torch
def test_another_architecture_is_named(tmp_path):
    _, _, path = make_file(tmp_path, 50, 4, schedule_lr=False)
    reference = convert_reference.read_reference_file(path)
    with pytest.raises(convert_reference.ConversionError) as error:
        convert_reference.convert(reference, config_for(18, 4))
    message = str(error.value)
    assert "layers.0.0.conv3.weight: the file holds another architecture" in message, message
    assert "bottleneck blocks (3, 4, 6, 3), gdreg's resnet50" in message
    assert "(basic blocks (2, 2, 2, 2))" in message
    # the right depth at another width: the stem names it, with the file's width
    with pytest.raises(
        convert_reference.ConversionError, match=r"stem\.0\.weight: shape .*width is 4"
    ):
        convert_reference.convert(reference, config_for(50, 8))


@needs_torch
def test_file_settings_that_differ_from_the_row_are_warned_of(tmp_path):
    _, _, path = make_file(tmp_path, 18, 4)
    reference = convert_reference.read_reference_file(path)
    conversion = convert_reference.convert(reference, config_for(18, 4, row="clipped"))
    text = " ".join(conversion.warnings)
    assert "initial_lr 0.8, the config optim.lr 0.4" in text
    assert "next learning rate" in text
    zero = convert_reference.convert(reference, config_for(18, 4), momentum="zero")
    from optax import tree_utils

    trace = tree_utils.tree_get(zero.state.opt_state, "trace")
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(trace))


@needs_torch
def test_a_bare_state_dict_converts_without_momentum(tmp_path):
    torch, _ = torch_modules()
    model, _, path = make_file(tmp_path, 18, 4)
    torch.save(model.state_dict(), path)
    reference = convert_reference.read_reference_file(path)
    assert (reference.layout, reference.step, reference.optimizer_state) == (
        "state_dict",
        None,
        None,
    )
    conversion = convert_reference.convert(reference, config_for(18, 4))
    assert int(conversion.state.epoch) == convert_reference.DEFAULT_EPOCH == 3000
    assert conversion.warnings == [f"{path} holds no optimizer state: the momentum starts at zero"]


@needs_torch
def test_a_file_that_would_run_code_is_refused(tmp_path):
    torch, _ = torch_modules()
    path = str(tmp_path / "pickled.pth")
    torch.save([None, {"fc.weight": torch.zeros(2, 2)}, None, None, np.int64(3000)], path)
    with pytest.raises(convert_reference.ConversionError, match="weights_only=True"):
        convert_reference.read_reference_file(path)


# ----- the command line, and the run it writes ----------------------------------------------------


def command(*args, hide_torch=False):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    start = "import sys; sys.modules['torch'] = None; " if hide_torch else "import sys; "
    code = start + "from gdreg.tools.convert_reference import run; sys.argv[0] = 'c'; run()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error(result, *words):
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all(word in errors[0] for word in words), errors[0]
    assert result.stdout == ""


def test_cli_without_torch_names_the_extra_and_writes_nothing(tmp_path):
    path = tmp_path / "final_fbaug_highreg_lr08_resnet18.pth"
    path.write_bytes(b"never read")
    result = command(str(path), f"--workdir={tmp_path / 'run'}", hide_torch=True)
    assert_one_error(result, "needs PyTorch", 'pip install "gdreg[torch]"')
    assert sorted(os.listdir(tmp_path)) == [path.name]


@needs_torch
def test_cli_another_architecture_is_one_error_line_and_nothing_is_written(tmp_path):
    _, _, path = make_file(tmp_path, 50, 4, schedule_lr=False)
    result = command(path, "--model=resnet18", "--row=strong", f"--workdir={tmp_path / 'run'}")
    assert_one_error(result, "layers.0.0.conv3.weight", "another architecture")
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no run, no partial folder


@pytest.mark.slow
@needs_torch
def test_converted_run_trains_on_and_the_tools_take_it(tmp_path, capsys):
    """The command writes a run that gdreg.main continues (with the analysis metrics), and
    that the landscape and the evaluation read."""
    _, _, path = make_file(tmp_path, 18, 4)
    workdir = str(tmp_path / "run")
    overrides = [
        "--config.model.width=4",
        "--config.data.name=synthetic",
        f"--config.data.synthetic_shape=({IMAGE}, {IMAGE}, 3)",
        "--config.data.synthetic_train_size=64",
        "--config.data.synthetic_test_size=32",
        "--config.data.padding=1",
        "--config.eval.batch_size=32",
        "--config.log.progress=False",
    ]
    config_file = f"--config={REPO}/configs/paper.py:resnet18,strong"
    result = command(path, f"--workdir={workdir}", config_file, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted" in result.stdout and "epoch 3000" in result.stdout
    assert "warning" not in result.stderr

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    more = [
        "--config.train.epochs=3002",
        "--config.eval.every_epochs=1",
        "--config.analysis.every_epochs=1",
    ]
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "gdreg.main",
            config_file,
            f"--workdir={workdir}",
            *overrides,
            *more,
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "resuming from the checkpoint of epoch 3000" in train.stderr
    records = rundir.read_metrics(workdir)
    assert [r["epoch"] for r in records] == [3001, 3002]
    config = rundir.read_config(workdir)
    schedule = experiment.make_optimizer(config, _plan(config)).schedule
    assert records[0]["lr"] == pytest.approx(float(schedule(3000)), rel=1e-6)
    assert {"test_accuracy", "analysis_param_norm", "analysis_momentum_norm"} <= records[-1].keys()

    from gdreg.tools import evaluate, landscape

    result = landscape.compute_landscape(workdir, points=3, span=0.5, test=True, progress=False)
    assert result["epoch"] == 3002 and np.all(np.isfinite(result["loss"]))
    assert len(result["test_accuracy"]) == 3
    assert evaluate.main(["--workdir", workdir, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["epoch"] == 3002 and figures["test_images"] == 32
    assert figures["test_accuracy"] == pytest.approx(records[-1]["test_accuracy"], abs=1e-6)
    assert figures["paper_accuracy"] == 95.67  # the row's number, beside, and why it differs
    assert "synthetic data" in figures["not_comparable"]
