"""docs/penalty.md stays true: its snippets, diffs and commands are what the tests run.

Every ``python`` block of the page is a file of docs/ (run here or in tests/test_dropin.py),
every ``diff`` block is the diff between one of Flax's loops rebuilt in docs/loops/ and the
same loop with the penalty (at most 5 changed lines each; both are run, and one step of the
penalized loop is compared with an explicit float64 Hessian), and every ``bash`` block runs.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from explicit_hessian import assert_tree_close, penalized_reference
from flax import nnx

import gdreg

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE = DOCS / "penalty.md"
LOOPS = ("linen_mnist", "nnx_mnist", "imagenet_step")
FOUR_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def _closed_form(loss_of_params, params, strength=0.5, lr=0.1):
    return penalized_reference(loss_of_params, params, strength=strength, lr=lr)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def _loop_diff(name: str) -> str:
    before = (DOCS / "loops" / f"{name}.py").read_text().splitlines(keepends=True)
    after = (DOCS / "loops" / f"{name}_penalty.py").read_text().splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(
            before, after, f"docs/loops/{name}.py", f"docs/loops/{name}_penalty.py", n=1
        )
    )


# --- the page ---------------------------------------------------------------------------------


def test_every_python_block_is_a_docs_file_and_every_snippet_is_shown():
    files = {path.read_text(): path.name for path in DOCS.glob("*.py")}
    shown = []
    for block in _blocks("python"):
        assert block in files, f"a python block of docs/penalty.md is no docs/ file:\n{block}"
        shown.append(files[block])
    assert sorted(shown) == sorted(path.name for path in DOCS.glob("penalty_*.py"))


@pytest.mark.parametrize("name", LOOPS)
def test_loop_diffs_are_shown_verbatim_and_change_at_most_five_lines(name):
    diff = _loop_diff(name)
    assert diff in _blocks("diff")
    lines = diff.splitlines()[2:]  # after the --- and +++ headers
    added = sum(line.startswith("+") for line in lines)
    removed = sum(line.startswith("-") for line in lines)
    assert added + removed <= 5, diff
    # The page states the count above each diff.
    assert f"(`docs/loops/{name}.py`), +{added}/-{removed} lines" in PAGE.read_text()


def test_the_page_runs_the_rate_snippet_of_the_moving_rate_test():
    # The indented two-line snippet of "A rate that changes at run time" is the test's code.
    test = (ROOT / "tests" / "test_penalty_defaults.py").read_text()
    for line in (
        'rate = opt_state[0].hyperparams["learning_rate"] * opt_state[1].scale',
        "value_and_grad(params, x, y, learning_rate=rate)",
    ):
        assert line in PAGE.read_text() and line in test


def test_bash_blocks_run():
    (command,) = _blocks("bash")
    argv = command.split()
    assert argv[:2] == [".venv/bin/python", "docs/finite_differences_on_relu.py"]
    result = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = {
        (method, float(eps)): float(ratio)
        for method, eps, ratio in re.findall(r"(\w+)\s+eps=(\S+): .* = (\S+)", result.stdout)
    }
    # Units on ReLU's kink at initialization: forward differences grow as 1/eps (the page
    # quotes 15, 142 and 1410 times the exact product).
    assert ratios[("forward", 1e-2)] > 5
    assert 5 < ratios[("forward", 1e-3)] / ratios[("forward", 1e-2)] < 20
    assert 5 < ratios[("forward", 1e-4)] / ratios[("forward", 1e-3)] < 20


# --- the snippets that tests/test_dropin.py does not run (it runs the data-parallel ones) ------------------------------------------


def test_transform_snippet_trains():
    losses = runpy.run_path(str(DOCS / "penalty_transform.py"))["losses"]
    assert losses[-1] < 0.5 * losses[0], losses


# --- Flax's three loops, before and after -------------------------------------------------------


@functools.cache
def _loop(name: str) -> dict:
    # As `python docs/loops/NAME.py` would, with the loops' folder first on the path (digits.py).
    sys.path.insert(0, str(DOCS / "loops"))
    try:
        return runpy.run_path(str(DOCS / "loops" / f"{name}.py"))
    finally:
        sys.path.remove(str(DOCS / "loops"))


@pytest.mark.parametrize("penalty", [False, True], ids=["flax", "penalty"])
def test_linen_mnist_trains(penalty):
    example = _loop("linen_mnist_penalty" if penalty else "linen_mnist")
    _, history = example["train_and_evaluate"]()
    assert history[-1][0] < 0.1 * history[0][0]
    assert history[-1][-1] > 0.9  # test accuracy


def test_linen_mnist_step_is_the_explicit_penalty(x64):
    example = _loop("linen_mnist_penalty")
    train, _ = example["get_datasets"]()
    images, labels = np.asarray(train["image"][:32], np.float64), train["label"][:32]
    state = example["create_train_state"](jax.random.key(1))
    state = state.replace(params=jax.tree.map(lambda p: np.asarray(p, np.float64), state.params))
    grads, _, _ = example["apply_model"](state, images, labels)

    def loss(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    assert_tree_close(grads, _closed_form(loss, state.params), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("penalty", [False, True], ids=["flax", "penalty"])
def test_nnx_mnist_trains(penalty):
    example = _loop("nnx_mnist_penalty" if penalty else "nnx_mnist")
    history = example["history"]
    assert history["train_loss"][-1] < 0.1 * history["train_loss"][0]
    assert history["test_accuracy"][-1] > 0.9


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
def test_nnx_mnist_recipe_line_is_the_explicit_penalty(x64):
    """The penalized loop's grad_fn line, with its loss_fn and model, at fixed dropout masks."""
    example = _loop("nnx_mnist_penalty")
    model = example["CNN"](rngs=nnx.Rngs(3))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), nnx.state(model, nnx.Param))
    nnx.update(model, params)
    model = nnx.view(model, deterministic=False, use_running_average=False)
    batch = next(example["make_batches"](example["train_images"], example["train_labels"], 16))
    batch = {"image": np.asarray(batch["image"], np.float64), "label": batch["label"]}
    rngs = nnx.Rngs(5)
    graphdef, params, rest = nnx.split((model, rngs), nnx.Param, ...)

    def loss(p):
        m, r = nnx.merge(graphdef, {0: p, 1: {}}, rest, copy=True)
        return example["loss_fn"](m, batch, r)[0]

    expected = _closed_form(loss, nnx.to_pure_dict(params)[0], lr=example["learning_rate"])
    grad_fn = gdreg.nnx_value_and_penalized_grad(
        example["loss_fn"], has_aux=True, learning_rate=example["learning_rate"]
    )
    _, grads = grad_fn(model, batch, rngs)
    assert_tree_close(nnx.to_pure_dict(grads), expected, rtol=1e-9, atol=1e-15)


def _imagenet_history(penalty: bool, half_precision: bool) -> list[float]:
    name = "imagenet_step_penalty" if penalty else "imagenet_step"
    code = (
        "import runpy, math\n"
        f"example = runpy.run_path({str(DOCS / 'loops' / (name + '.py'))!r})\n"
        f"example['CONFIG'].half_precision = {half_precision}\n"
        "_, history = example['train_and_evaluate'](example['CONFIG'])\n"
        "assert all(map(math.isfinite, history)) and history[-1] < 0.5 * history[0], history\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=FOUR_DEVICES, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    ("penalty", "half_precision"),
    [(False, False), (True, False), (True, True)],
    ids=["flax", "penalty", "penalty-float16-dynamic-scale"],
)
def test_imagenet_step_trains_on_four_devices(penalty, half_precision):
    result = _imagenet_history(penalty, half_precision)
    assert result.returncode == 0, result.stderr[-3000:]


def test_imagenet_step_is_the_explicit_penalty_of_the_whole_batch(x64):
    """One pmapped step of the penalized train_step: cross-replica BatchNorm and the weight
    decay inside the loss are part of L; the update is the SGD step with the penalized
    gradient of the whole batch, from an explicit float64 Hessian."""
    example = _loop("imagenet_step_penalty")
    config = example["CONFIG"]
    devices = jax.devices()[:4]
    model = example["ResNet"](num_classes=example["NUM_CLASSES"], dtype=jnp.float64)
    steps_per_epoch = 4
    learning_rate_fn = example["create_learning_rate_fn"](
        config, config.learning_rate, steps_per_epoch
    )
    state = example["create_train_state"](jax.random.key(0), config, model, 8, learning_rate_fn)
    state = state.replace(params=jax.tree.map(lambda p: np.asarray(p, np.float64), state.params))
    step = 6  # after the warmup from 0
    counts = lambda x: np.int32(step) if jnp.issubdtype(x.dtype, jnp.integer) else x  # noqa: E731
    state = state.replace(step=step, opt_state=jax.tree.map(counts, state.opt_state))
    # 4 images per device: the explicit Hessian (1452 parameters) stays quick.
    batch = next(example["synthetic_batches"](SimpleNamespace(batch_size=16), 1))
    batch = {
        "image": np.asarray(batch["image"], np.float64).reshape(4, -1, 8, 8, 3),
        "label": batch["label"].reshape(4, -1),
    }
    p_train_step = jax.pmap(
        functools.partial(example["train_step"], learning_rate_fn=learning_rate_fn),
        in_axes=(None, 0),
        out_axes=(None, 0),
        axis_name="batch",
        devices=devices,
    )
    new_state, _ = p_train_step(state, batch)

    whole = example["ResNet"](num_classes=example["NUM_CLASSES"], dtype=jnp.float64, axis_name=None)
    images = batch["image"].reshape(-1, 8, 8, 3)
    labels = batch["label"].reshape(-1)

    def loss(params):
        logits, _ = whole.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, mutable=["batch_stats"]
        )
        l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
        return example["cross_entropy_loss"](logits, labels) + 0.0001 * 0.5 * l2

    lr = float(learning_rate_fn(step))
    expected = _closed_form(loss, state.params, lr=lr)
    # Nesterov SGD from a zero trace: params - lr * (1 + momentum) * g.
    used = jax.tree.map(
        lambda old, new: (old - new) / (lr * (1 + config.momentum)), state.params, new_state.params
    )
    # (the update is ~1e-6 of the parameters: their difference keeps ~8 digits)
    assert_tree_close(used, expected, rtol=1e-6, atol=1e-12)
