"""Benchmark of one regularized full-batch training step: ``python -m gdreg.bench``.

Times exactly what ``gdreg.main`` runs per step (augmentation, the sharded per-block gradient
with the penalty, the mean, clipping, weight decay, Nesterov momentum) on synthetic
CIFAR-shaped data, and prints one line per dataset size:

    model=resnet18 width=16 images=512 block=32 method=forward dtype=float32 devices=1
    compile_s=... seconds_per_step=... images_per_second=... peak_memory_mb=... flop_fraction=...

``seconds_per_step`` is the median over ``--steps`` steps after a compiling warm-up step.
``images_per_second`` counts each image once per step. ``peak_memory_mb`` is the devices'
peak allocation where the backend reports it (GPUs), else the process's peak resident set
size. ``flop_fraction`` is the XLA cost-analysis FLOP count of a step divided by the time and
the device's peak dense rate, for the device kinds in ``PEAK_FLOPS``. Several ``--images``
values show whether memory grows with the dataset beyond the resident uint8 images.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax

from gdreg import distributed, train
from gdreg.config import base_config
from gdreg.fullbatch import replicate

# Peak dense rates (FLOP/s) per device kind and compute dtype, from the vendors' data sheets.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
}


def bench_config(args: argparse.Namespace, images: int):
    config = base_config()
    config.model.name = args.model
    config.model.width = args.width
    config.model.dtype = args.dtype
    config.data.name = "synthetic"
    config.data.synthetic_train_size = images
    config.data.synthetic_test_size = 16
    config.train.block_size = args.block
    config.train.blocks_per_microbatch = args.blocks_per_microbatch
    config.train.microbatch_loop = args.microbatch_loop
    config.train.block_loop = args.block_loop
    config.train.cpu_devices = args.cpu_devices
    config.penalty.method = args.method
    config.penalty.strength = args.strength
    config.log.progress = False
    return config


def peak_memory_mb() -> float:
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_one(args: argparse.Namespace, images: int) -> dict:
    config = bench_config(args, images)
    run = train.build(config)
    state = replicate(train.initial_state(run), run.mesh)
    apply_update = train.make_apply_update(run.tx)

    start = time.perf_counter()
    state, _ = train.run_epoch(run, state, apply_update)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, _ = train.run_epoch(run, state, apply_update)
        jax.block_until_ready(state["params"])
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    layout = train.epoch_layouts(run, 0)[0]
    used = layout.size
    flops = None
    if args.flops:
        penalty_state = state["penalty_state"] if run.penalty else None
        flops = run.engine.step_flops(
            state["params"], state["model_state"], penalty_state, run.train_data, layout
        )
    kind = jax.devices()[0].device_kind
    peak = PEAK_FLOPS.get(kind, {}).get(args.dtype)
    return {
        "model": args.model,
        "width": args.width,
        "images": used,
        "block": args.block,
        "method": args.method if args.strength > 0 else "none",
        "dtype": args.dtype,
        "devices": jax.device_count(),
        "device_kind": kind.replace(" ", "_"),
        "compile_s": round(compile_seconds - seconds, 2),
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(used / seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "tflop_per_step": f"{flops / 1e12:.4g}" if flops else "n/a",
        "flop_fraction": round(flops / seconds / peak, 4) if flops and peak else "n/a",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", default="512", help="comma-separated dataset sizes")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--method", default="forward", choices=("forward", "central", "jvp"))
    parser.add_argument("--strength", type=float, default=0.5, help="0: no penalty")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--blocks-per-microbatch", type=int, default=0, help="0: default")
    parser.add_argument("--microbatch-loop", default="", choices=("", "python", "scan"))
    parser.add_argument("--block-loop", default="", choices=("", "unroll", "vmap"))
    parser.add_argument(
        "--cpu-devices", type=int, default=0, help="CPU: devices per host; 0: one per core"
    )
    parser.add_argument("--no-flops", dest="flops", action="store_false")
    args = parser.parse_args(argv)
    distributed.configure_cpu_devices(distributed.cpu_devices_for(args.cpu_devices, fullbatch=True))
    results = []
    for images in (int(size) for size in args.images.split(",")):
        result = bench_one(args, images)
        print(" ".join(f"{key}={value}" for key, value in result.items()), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
