"""Benchmark of a training step: ``python -m gdreg.tools.bench --config FILE[:ARG]``.

Times exactly what ``gdreg.main`` runs per epoch for the given config (augmentation, the
sharded per-block gradient with the penalty, the mean, clipping, weight decay, Nesterov
momentum), on synthetic data of the config's ``data.synthetic_shape`` (CIFAR-shaped by default)
with ``--images`` training images, and prints one line per dataset size::

    python -m gdreg.tools.bench --config configs/resnet18_fb.py:strong --config.model.width=16 \
        --images 512,1024

    model=resnet18 width=16 mode=fullbatch images=512 block=32 method=forward dtype=float32
    devices=2 ... blocks_per_microbatch=1 microbatch_loop=python block_loop=unroll compile_s=...
    seconds_per_step=... images_per_second=... peak_memory_mb=... flop_fraction=...

Any field can be overridden as in ``gdreg.main`` (``--config.model.dtype=bfloat16``,
``--config.train.blocks_per_microbatch=8``, ``--config.penalty.method=jvp``, ...).
``seconds_per_step`` is the median over ``--steps`` epochs after a compiling warm-up epoch
(in full-batch mode one epoch is one step). ``images_per_second`` counts each image once per
epoch. ``peak_memory_mb`` is the devices' peak allocation where the backend reports it (GPUs),
else the process's peak resident set size. ``flop_fraction`` is the XLA cost-analysis FLOP
count of an epoch divided by its time and the device's peak dense rate, for the device kinds
in ``PEAK_FLOPS``. Several ``--images`` values show whether memory grows with the dataset
beyond the resident uint8 images.

Stochastic configs (``train.mode=stochastic``, the SGD baseline) time whole epochs of
``images // train.batch_size`` minibatch steps and print ``batch``, ``seconds_per_epoch`` and
``seconds_per_step`` per minibatch step.

The loop shape timed is the one the config's loop fields set (``train.blocks_per_microbatch``,
``train.microbatch_loop``, ``train.block_loop``), with the backend's defaults for those left
unset; the line names it. ``--sweep`` instead runs the autotuner that training runs on GPUs
(:mod:`gdreg.program.autotune`; fields the config sets stay fixed) within ``train.autotune_seconds``
(``--config.train.autotune_seconds=900`` for every candidate of a full-size run) and prints one
``sweep`` line per candidate (``seconds_per_step`` and ``compile_s``, or ``skipped=`` and why)
and a ``chosen`` line with the fastest shape; pass that shape's fields to time it alone
(``launch/gpu_check.sh`` does both, through :mod:`gdreg.tools.gpu_check`).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from gdreg.engine.mesh import replicate
from gdreg.program import autotune, cli, distributed, exitcodes, experiment
from gdreg.program import loop as train
from gdreg.program.config import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (any gdreg.main config).", lock_config=True
)
flags.DEFINE_list("images", ["512"], "Training set sizes to time, comma-separated.")
flags.DEFINE_integer("steps", 3, "Timed steps per size (after one compiling step).", lower_bound=1)
flags.DEFINE_bool("flops", True, "Report XLA's FLOP count per step (--noflops: skip).")
flags.DEFINE_bool(
    "sweep",
    False,
    "Instead of timing steps: time every loop shape the autotuner tries (within "
    "train.autotune_seconds) and print the table and the choice.",
)
flags.mark_flags_as_required(["config"])

# Peak dense rates (FLOP/s) per device kind and compute dtype, from the vendors' data sheets.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
}


def bench_config(config: ml_collections.ConfigDict, images: int) -> ml_collections.ConfigDict:
    """``config`` on ``images`` synthetic training images (16 test images), without a bar."""
    config = config.copy_and_resolve_references()
    config.data.name = "synthetic"
    config.data.train_size = 0
    config.data.test_size = 0
    config.data.synthetic_train_size = images
    config.data.synthetic_test_size = 16
    config.log.progress = False
    return config


def peak_memory_mb() -> float:
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flop_fraction(flop_count: float | None, seconds: float, dtype: str) -> float | str:
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind, {}).get(dtype)
    return round(flop_count / seconds / peak, 4) if flop_count and peak else "n/a"


def _build(config: ml_collections.ConfigDict, images: int):
    run = experiment.build(bench_config(config, images))
    return run, replicate(experiment.initial_state(run), run.mesh)


def sweep(
    config: ml_collections.ConfigDict, images: int
) -> tuple[autotune.LoopShape, list[autotune.Trial]]:
    """The autotuner's choice and table for ``config`` on ``images`` synthetic images.

    Times as training with ``train.autotune="on"`` would (the fields the config sets stay
    fixed; ``train.autotune_seconds`` bounds it); the table is empty where a single shape is
    possible.
    """
    run, state = _build(config, images)
    return autotune.tune(run, state, mode="on")


def bench_one(
    config: ml_collections.ConfigDict, images: int, *, steps: int = 3, flops: bool = True
) -> dict:
    """Times ``steps`` epochs of ``config`` on ``images`` synthetic images after a compiling one.

    In the loop shape of the config's fields, the backend's defaults for the others (nothing is
    timed beforehand, so that the peak memory is this shape's). A full-batch epoch is one step;
    a stochastic one is ``images // train.batch_size`` minibatch steps.
    """
    run, state = _build(config, images)
    config = run.config
    engine = run.engine
    shape = autotune.LoopShape(
        engine.blocks_per_microbatch, engine.microbatch_loop, engine.block_loop
    )
    train_step = train.make_step(run)

    start = time.perf_counter()
    state, _ = train.run_epoch(run, state, train_step)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, _ = train.run_epoch(run, state, train_step)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    layouts = run.epoch_layouts(0)
    used = sum(layout.size for layout in layouts)
    flop_count = None
    if flops and config.train.mode == "stochastic":
        # Every minibatch of an epoch has the same shape: one count (per device), times their
        # number and the devices.
        parts = (state.params, state.opt_state, state.model_state, state.penalty_state)
        per_device = train_step.minibatch_flops(parts, run.train_data, config.train.batch_size)
        flop_count = per_device * len(layouts) * run.mesh.devices.size if per_device else None
    elif flops:
        flop_count = run.engine.step_flops(
            state.params, state.model_state, state.penalty_state, run.train_data, layouts[0]
        )
    dtype = config.model.dtype
    penalized = config.penalty.strength > 0 or config.penalty.full_strength > 0
    stochastic = config.train.mode == "stochastic"
    # A stochastic step is one block of batch_size images.
    unit = {"batch": config.train.batch_size} if stochastic else {"block": config.train.block_size}
    steps_per_epoch = len(layouts)
    return {
        "model": config.model.name,
        "width": config.model.width,
        "mode": config.train.mode,
        "images": used,
        **unit,
        "method": config.penalty.method if penalized else "none",
        "dtype": dtype,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind.replace(" ", "_"),
        **shape._asdict(),
        "compile_s": round(compile_seconds - seconds, 2),
        **({"seconds_per_epoch": round(seconds, 4)} if stochastic else {}),
        "seconds_per_step": round(seconds / steps_per_epoch, 6 if stochastic else 4),
        "images_per_second": round(used / seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "tflop_per_step": f"{flop_count / steps_per_epoch / 1e12:.4g}" if flop_count else "n/a",
        "flop_fraction": _flop_fraction(flop_count, seconds, dtype),
    }


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    try:
        sizes = [int(size) for size in FLAGS.images]
    except ValueError:
        print(f"error: --images takes whole numbers, got {','.join(FLAGS.images)}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    distributed.configure_cpu_devices(
        distributed.cpu_devices_for(
            config.train.cpu_devices,
            fullbatch=config.train.mode == "fullbatch",
            batch_size=config.train.batch_size,
        )
    )
    for images in sizes:
        try:
            if FLAGS.sweep:
                shape, trials = sweep(config, images)
            else:
                result = bench_one(config, images, steps=FLAGS.steps, flops=FLAGS.flops)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return exitcodes.BAD_INPUT
        if FLAGS.sweep:
            for trial in trials:
                print(f"sweep images={images} {trial.describe()}", flush=True)
            by = "fastest" if trials else "single_candidate"
            print(f"chosen images={images} {shape} by={by}", flush=True)
        else:
            print(" ".join(f"{key}={value}" for key, value in result.items()), flush=True)
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-bench``."""
    cli.run_command(main, __doc__)


if __name__ == "__main__":
    run()
