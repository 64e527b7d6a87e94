"""Float32 accuracy of the full-batch gradient: ``python -m gdreg.tools.precision --config
FILE[:ARG]``.

Computes the full-batch gradient of a run, the mean penalized block gradient that one
training step hands to the optimizer (before clipping), twice over the same blocks and
augmentation draws: once as the run computes it (``model.dtype``, float32 parameters, on the
default devices) and once in float64 (``jax.enable_x64``, float64 parameters, inputs and
compute, on the CPU devices: float64 from the uint8 images on), and prints how far the first is
from the second::

    python -m gdreg.tools.precision --config configs/resnet18_fb.py:strong --config.model.width=16 \
        --config.data.name=synthetic
    python -m gdreg.tools.precision --workdir runs/resnet18/strong    # at its latest checkpoint

    model=resnet18 width=16 dtype=float32 reference=float64 epoch=0 images=512 blocks=16 ...
    loss=... loss_float64=... loss_error=... loss_relative_error=...
    grad_norm_linf=... grad_norm_l2=... grad_norm_l1=...
    error_linf=... error_l2=... error_l1=... relative_error_linf=... relative_error_l2=... ...
    leaf=conv1/kernel shape=3x3x3x16 max_error=... max_relative_error=... relative_error_l2=...

With ``--config`` the parameters are the run's initial ones (``seed``) and the blocks those of
epoch 0; with ``--workdir`` (instead of ``--config``) the run's ``config.json`` and its latest
checkpoint, with the blocks of the epoch after it (in stochastic mode the epoch's minibatches
are the blocks). Fields are overridden as in ``gdreg.main``. One process only; the float64
pass runs on the host's CPU devices (``train.cpu_devices``), so keep the set small for large
models (``--config.data.train_size``).

The reference implementation's ``measure_floating_point_accuracy.py``
(``_measure_implementation_noise`` in its ``fullbatch/training/training.py``) measures the
run-to-run noise of two float32 gradient evaluations at one checkpoint and prints the norms
of the gradient (L-inf, L2, L1) and of the difference, absolute and relative. The same
figures here, with the float64 gradient g64 as the second evaluation: ``grad_norm_*`` are
norms of g64, ``error_*`` norms of g - g64, ``relative_error_*`` their ratios (the relative
error of the gradient is ``relative_error_l2`` = ||g - g64|| / ||g64||). The reference's
L-inf "norm" is the largest entry, not the largest magnitude; here it is the largest
magnitude. Beside them: the loss of both evaluations, and per parameter leaf the largest
|g - g64|, that divided by the leaf's largest |g64| (``max_relative_error``) and the leaf's
||g - g64|| / ||g64||.

Exit status 2 with one ``error:`` line for a bad flag, config field, dataset or run directory.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from gdreg import data
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.engine.signatures import PyTree
from gdreg.program import cli, distributed, exitcodes, experiment, rundir, saved_run
from gdreg.program.config import ConfigError
from gdreg.program.rundir import RunDirError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: :func:`measure` is a library
    function, and other gdreg commands define ``--config`` too)."""
    if "workdir" in FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None, "Training configuration file (any gdreg.main config).", lock_config=True
    )
    flags.DEFINE_string(
        "workdir", None, "A run directory: its config and latest checkpoint (instead of --config)."
    )


REFERENCE_DTYPE = "float64"


def _floating_as(tree: PyTree, dtype: Any) -> PyTree:
    """The floating leaves of ``tree`` as host arrays of ``dtype``; other leaves as they are."""

    def cast(leaf):
        leaf = np.asarray(leaf)
        return leaf.astype(dtype) if np.issubdtype(leaf.dtype, np.floating) else leaf

    return jax.tree.map(cast, tree)


def full_gradient(
    run: experiment.Run,
    state: experiment.TrainState,
    layout: np.ndarray,
    epoch: int,
    *,
    dtype: str,
    devices: list[jax.Device],
) -> tuple[PyTree, float]:
    """The run's full-batch gradient (mean penalized block gradient, host arrays) and loss at
    ``state`` (host arrays) over ``layout`` with the augmentation of ``epoch``, the model
    computing in ``dtype`` on ``devices``; float64 needs ``jax.enable_x64``.

    Parameters are float32 (float64 for ``dtype`` float64), so that the gradient is too; the
    batch functions normalize the images in the same precision (:func:`gdreg.data.input_dtype`,
    chosen when the engine traces them, here under ``jax.enable_x64`` for float64).
    """
    config = run.config.copy_and_resolve_references()
    config.model.dtype = dtype
    model = experiment.make_model(config, run.dataset.num_classes)
    optimizer = experiment.make_optimizer(config, run.plan, run.dataset.num_classes)
    train_batch, _ = experiment.make_batch_fns(config, run.dataset)
    mesh = data_mesh(devices)
    engine = experiment.make_engine(config, model, train_batch, optimizer.penalty, mesh)
    param_dtype = jnp.promote_types(jnp.float32, jnp.dtype(dtype))
    result = engine(
        replicate(_floating_as(state.params, param_dtype), mesh),
        replicate(_floating_as(state.model_state, param_dtype), mesh),
        replicate(state.penalty_state, mesh),
        replicate({"images": run.dataset.train_images, "labels": run.dataset.train_labels}, mesh),
        layout,
        epoch,
    )
    return fetch_replicated(result.grads), float(fetch_replicated(result.metrics["loss"]))


def _norms(leaves: list[np.ndarray]) -> dict[str, float]:
    """L-inf, L2 and L1 norms of the concatenation of ``leaves``."""
    return {
        "linf": max((float(np.max(np.abs(leaf))) for leaf in leaves if leaf.size), default=0.0),
        "l2": math.sqrt(sum(float(np.sum(np.square(leaf))) for leaf in leaves)),
        "l1": sum(float(np.sum(np.abs(leaf))) for leaf in leaves),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else (0.0 if not numerator else math.inf)


def compare(grads: PyTree, reference: PyTree, loss: float, reference_loss: float) -> dict[str, Any]:
    """The figures of the module docstring for ``grads`` against ``reference`` (in float64)."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
    low = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(grads)]
    high = [np.asarray(leaf, np.float64) for _, leaf in paths_and_leaves]
    errors = [a - b for a, b in zip(low, high, strict=True)]
    norms, error_norms = _norms(high), _norms(errors)
    loss_error = abs(loss - reference_loss)
    figures: dict[str, Any] = {
        "loss": loss,
        "loss_float64": reference_loss,
        "loss_error": loss_error,
        "loss_relative_error": _ratio(loss_error, abs(reference_loss)),
    }
    figures.update({f"grad_norm_{kind}": value for kind, value in norms.items()})
    figures.update({f"error_{kind}": value for kind, value in error_norms.items()})
    figures.update(
        {f"relative_error_{kind}": _ratio(error_norms[kind], norms[kind]) for kind in norms}
    )
    leaves = []
    for (path, _), error, reference_leaf in zip(paths_and_leaves, errors, high, strict=True):
        leaf_norms, leaf_errors = _norms([reference_leaf]), _norms([error])
        leaves.append(
            {
                "leaf": "/".join(str(getattr(key, "key", key)) for key in path),
                "shape": "x".join(str(size) for size in reference_leaf.shape) or "scalar",
                "max_error": leaf_errors["linf"],
                "max_relative_error": _ratio(leaf_errors["linf"], leaf_norms["linf"]),
                "relative_error_l2": _ratio(leaf_errors["l2"], leaf_norms["l2"]),
            }
        )
    figures["leaves"] = leaves
    return figures


def measure(
    config: ml_collections.ConfigDict | None = None, *, workdir: str | None = None
) -> dict[str, Any]:
    """Builds the run of ``config`` (initial parameters) or of ``workdir`` (its latest
    checkpoint) and compares its full-batch gradient with the float64 one; see the module
    docstring. Raises ConfigError, DatasetNotFoundError or RunDirError for bad input."""
    if (config is None) == (workdir is None):
        raise ValueError("give either a config or a workdir")
    if workdir is not None:
        run = saved_run.load_run(workdir)
        state = saved_run.load_checkpoint(run, workdir)
    else:
        run = experiment.build(config)
        state = experiment.initial_state(run)
    epoch = int(state.epoch)
    layout = run.epoch_blocks(epoch)
    dtype = run.config.model.dtype
    grads, loss = full_gradient(run, state, layout, epoch, dtype=dtype, devices=jax.devices())
    cpus = jax.devices("cpu")
    with jax.enable_x64(True), jax.default_device(cpus[0]):
        reference, reference_loss = full_gradient(
            run, state, layout, epoch, dtype=REFERENCE_DTYPE, devices=cpus
        )
    setting = {
        "model": run.config.model.name,
        "width": run.config.model.width,
        "dtype": jnp.dtype(dtype).name,
        "reference": REFERENCE_DTYPE,
        "epoch": epoch,
        "images": int(layout.size),
        "blocks": int(layout.shape[0]),
        "block_size": int(layout.shape[1]),
        "devices": jax.device_count(),
        "reference_devices": len(cpus),
    }
    return {**setting, **compare(grads, reference, loss, reference_loss)}


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def report_lines(figures: dict[str, Any]) -> list[str]:
    """The printed report: setting, loss, gradient norms, errors, then one line per leaf."""
    groups = [
        ["model", "width", "dtype", "reference", "epoch", "images", "blocks", "block_size"],
        ["loss", "loss_float64", "loss_error", "loss_relative_error"],
        ["grad_norm_linf", "grad_norm_l2", "grad_norm_l1"],
        ["error_linf", "error_l2", "error_l1"],
        ["relative_error_linf", "relative_error_l2", "relative_error_l1"],
    ]
    groups[0] += ["devices", "reference_devices"]
    lines = [" ".join(f"{key}={_format(figures[key])}" for key in group) for group in groups]
    lines += [
        " ".join(f"{key}={_format(value)}" for key, value in leaf.items())
        for leaf in figures["leaves"]
    ]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    config, workdir = FLAGS.config, FLAGS.workdir
    if (config is None) == (workdir is None):
        print("error: give --config FILE[:ARG] or --workdir RUN_DIR (one of them)", file=sys.stderr)
        return exitcodes.BAD_INPUT
    try:
        requested = (config or rundir.read_config(workdir)).train.cpu_devices
        distributed.configure_cpu_devices(distributed.cpu_devices_for(requested, fullbatch=True))
        figures = measure(config, workdir=workdir)
    except (ConfigError, data.DatasetNotFoundError, RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    for line in report_lines(figures):
        print(line, flush=True)
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-precision``."""
    _define_flags()
    cli.run_command(main, __doc__)


if __name__ == "__main__":
    run()
