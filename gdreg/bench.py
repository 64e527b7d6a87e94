"""Benchmark of one full-batch training step: ``python -m gdreg.bench --config FILE[:ARG]``.

Times exactly what ``gdreg.main`` runs per step for the given config (augmentation, the sharded
per-block gradient with the penalty, the mean, clipping, weight decay, Nesterov momentum), on
synthetic data of the config's ``data.synthetic_shape`` (CIFAR-shaped by default) with
``--images`` training images, and prints one line per dataset size::

    python -m gdreg.bench --config configs/resnet18_fb.py:strong --config.model.width=16 \
        --images 512,1024

    model=resnet18 width=16 images=512 block=32 method=forward dtype=float32 devices=2 ...
    compile_s=... seconds_per_step=... images_per_second=... peak_memory_mb=... flop_fraction=...

Any field can be overridden as in ``gdreg.main`` (``--config.model.dtype=bfloat16``,
``--config.train.blocks_per_microbatch=8``, ``--config.penalty.method=jvp``, ...).
``seconds_per_step`` is the median over ``--steps`` steps after a compiling warm-up step.
``images_per_second`` counts each image once per step. ``peak_memory_mb`` is the devices'
peak allocation where the backend reports it (GPUs), else the process's peak resident set
size. ``flop_fraction`` is the XLA cost-analysis FLOP count of a step divided by the time and
the device's peak dense rate, for the device kinds in ``PEAK_FLOPS``. Several ``--images``
values show whether memory grows with the dataset beyond the resident uint8 images.
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

from gdreg import cli, distributed, exitcodes, experiment, train
from gdreg.config import ConfigError, require_full_batch
from gdreg.sharding import replicate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (any gdreg.main config).", lock_config=True
)
flags.DEFINE_list("images", ["512"], "Training set sizes to time, comma-separated.")
flags.DEFINE_integer("steps", 3, "Timed steps per size (after one compiling step).", lower_bound=1)
flags.DEFINE_bool("flops", True, "Report XLA's FLOP count per step (--noflops: skip).")
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


def bench_one(
    config: ml_collections.ConfigDict, images: int, *, steps: int = 3, flops: bool = True
) -> dict:
    """Times ``steps`` full-batch steps of ``config`` on ``images`` synthetic images."""
    config = bench_config(config, images)
    run = experiment.build(config)
    state = replicate(experiment.initial_state(run), run.mesh)
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
    layout = experiment.epoch_layouts(run, 0)[0]
    used = layout.size
    flop_count = None
    if flops:
        flop_count = run.engine.step_flops(
            state.params, state.model_state, state.penalty_state, run.train_data, layout
        )
    kind = jax.devices()[0].device_kind
    dtype = config.model.dtype
    peak = PEAK_FLOPS.get(kind, {}).get(dtype)
    penalized = config.penalty.strength > 0 or config.penalty.full_strength > 0
    return {
        "model": config.model.name,
        "width": config.model.width,
        "images": used,
        "block": config.train.block_size,
        "method": config.penalty.method if penalized else "none",
        "dtype": dtype,
        "devices": jax.device_count(),
        "device_kind": kind.replace(" ", "_"),
        "compile_s": round(compile_seconds - seconds, 2),
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(used / seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "tflop_per_step": f"{flop_count / 1e12:.4g}" if flop_count else "n/a",
        "flop_fraction": round(flop_count / seconds / peak, 4) if flop_count and peak else "n/a",
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
    try:
        require_full_batch(config, "gdreg.bench")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    distributed.configure_cpu_devices(
        distributed.cpu_devices_for(config.train.cpu_devices, fullbatch=True)
    )
    for images in sizes:
        try:
            result = bench_one(config, images, steps=FLAGS.steps, flops=FLAGS.flops)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return exitcodes.BAD_INPUT
        print(" ".join(f"{key}={value}" for key, value in result.items()), flush=True)
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-bench``."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
