"""One prepared check of a GPU: is the fast path right, and how fast is it beside the reference?

    launch/gpu_check.sh                    # WHEELS=DIR installs what is missing, PEER=DIR adds
                                           # the reference implementation's step
    python -m gdreg.tools.gpu_check [--peer DIR] [--budget_seconds 0] [--allow_cpu]

Made for a short, offline GPU slot (docs/performance.md): it first checks that the device
computes what the CPU computes, then times what the paper's runs cost there, and prints one
``name=value`` line per figure and, last, the summary table in docs/performance.md's format.

1. Correctness, at small size, against float64 on the host CPU (:func:`check_penalty`,
   :func:`check_engine`): the penalty's term ``strength * lr / 4 * H g`` computed on the device
   in float32 against the explicit Hessian; the sharded full-batch engine in the device's loop
   shape (several blocks per call, batched blocks) against a naive per-block loop. A wrong
   answer ends the run (exit 1) before any timing.
2. The device's matrix-multiply rate in bfloat16 and float32 (:func:`peak_matmul_rate`), the
   yardstick of the ``flop_fraction`` figures (XLA's FLOP count of a step over its time and
   this rate).
3. ResNet-18 at full width on CIFAR-shaped synthetic images (50,000 by default): the
   regularized full-batch step of the paper's strong row (forward differences, strength 0.5,
   clipping, Nesterov; ``configs/resnet18_fb.py:regularized``) with blocks of 128, in bfloat16
   and float32, each in the GPU's default loop shape (what the autotuner chose on an H200) or,
   with ``--budget_seconds`` > 0, in the shape the autotuner picks within half of it, then timed
   alone in a fresh process (its peak memory is its own); the SGD baseline at
   batch 128 in both dtypes (images per second over an epoch). Each through
   ``python -m gdreg.tools.bench``, so the figures are what that command prints.
4. With ``--peer DIR`` (a folder with the team's ``reference_step.py`` and the reference
   implementation's ``fullbatch/models``): the same steps with the paper authors' PyTorch code
   on the same device (float32, and its float16 ``mixed_precision``), and the ratios
   reference / gdreg that docs/performance.md quotes.

``--allow_cpu`` runs everything on the CPU at toy sizes (width 4, 8x8 images), which is how
the test suite keeps this script from rotting between GPU slots.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from gdreg.engine.fullbatch import FullBatchGradient, block_layout
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.penalty.hessian import penalized_gradient
from gdreg.penalty.transform import gradient_norm_penalty
from gdreg.program import cli, exitcodes

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: its functions are used as a
    library by the tests, beside other gdreg commands that define flags of the same names)."""
    if "allow_cpu" in FLAGS:
        return
    flags.DEFINE_bool("allow_cpu", False, "Run where JAX sees no GPU, at toy sizes.")
    flags.DEFINE_string("peer", None, "Folder with reference_step.py and fullbatch/models.")
    flags.DEFINE_float(
        "budget_seconds",
        0.0,
        "Loop-shape autotuning budget over both dtypes (0: the default shape, no sweep).",
        lower_bound=0.0,
    )
    flags.DEFINE_integer("steps", 2, "Timed steps (SGD: epochs) after the compiling one.")
    flags.DEFINE_integer("images", 0, "Training images (0: 50,000; 64 with --allow_cpu).")
    flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes to time.")


#: The regularized step's settings beside the config file's row (docs/performance.md).
BLOCK_SIZE = 128
SGD_BATCH = 128
DTYPES = ("bfloat16", "float32")
#: Relative error allowed against float64. The device multiplies float32 matrices in TF32 on
#: NVIDIA GPUs (JAX's default precision), whose 10-bit mantissa gives errors near 1e-3 in a
#: Hessian-vector product of a small network; a wrong sign, a missing factor or a skipped block
#: is off by far more.
TOLERANCE = 2e-2


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one check: the real ones on a GPU; toy ones on a CPU, where the small
    ``convnet2`` stands in for ResNet-18 (the CPU form checks the script, not the network: the
    benchmark's own tests time ResNet-18 on CPUs)."""

    model: str
    width: int
    images: int
    block: int
    sgd_batch: int
    shape: tuple[int, int, int]
    matmul: int


GPU_SIZES = Sizes("resnet18", 64, 50_000, BLOCK_SIZE, SGD_BATCH, (32, 32, 3), 8192)
CPU_SIZES = Sizes("convnet2", 4, 64, 16, 16, (8, 8, 3), 512)


def emit(name: str, value: Any) -> None:
    """One figure, ``name=value``, on its own line (the table of docs/performance.md is filled
    from them)."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{name}={text}", flush=True)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


# ----- 1. correctness ---------------------------------------------------------------------


def _mlp_loss(params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - targets) ** 2)


def check_penalty(strength: float = 0.5, learning_rate: float = 0.8) -> float:
    """Relative error of the penalty's term on the device in float32 (exact ``jvp``), against
    ``strength * lr / 4 * H g`` with the explicit float64 Hessian ``H`` of a smooth network's
    loss on the host CPU (Geiping et al., ICLR 2022: ``g' = g + lr / 4 * H (strength g)``)."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(6, 16)) / np.sqrt(6),
        "b1": rng.normal(size=(16,)) * 0.1,
        "w2": rng.normal(size=(16, 2)) / 4,
    }
    inputs, targets = rng.normal(size=(32, 6)), rng.normal(size=(32, 2))
    device = jax.devices()[0]
    as32 = jax.tree.map(lambda x: jax.device_put(np.float32(x), device), (params, inputs, targets))
    p32, x32, y32 = as32

    @jax.jit
    def term(p):
        grads = jax.grad(_mlp_loss)(p, x32, y32)
        penalized = penalized_gradient(
            lambda q: jax.grad(_mlp_loss)(q, x32, y32),
            p,
            grads,
            strength=strength,
            learning_rate=learning_rate,
            method="jvp",
        )
        return jax.tree.map(jnp.subtract, penalized, grads)

    actual = ravel_pytree(fetch_replicated(term(p32)))[0]
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        flat, unravel = ravel_pytree(jax.tree.map(jnp.float64, params))

        def flat_loss(v):
            return _mlp_loss(unravel(v), jnp.float64(inputs), jnp.float64(targets))

        gradient = jax.grad(flat_loss)(flat)
        hessian = jax.hessian(flat_loss)(flat)
        expected = np.asarray(strength * learning_rate / 4 * hessian @ gradient)
    return relative_error(actual, expected)


class _SmallConvNet(nn.Module):
    """Two convolutions with BatchNorm statistics per block, as the engine's models have."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (4, 8):
            x = nn.Conv(features, (3, 3), padding=1, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = jnp.tanh(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def check_engine(images: int = 64, block_size: int = 8) -> float:
    """Relative error of the sharded engine's mean penalized block gradient, in the loop shape
    GPUs use (several blocks per compiled call, batched, in a ``lax.scan``), on the device in
    float32, against a naive loop over the blocks in float64 on the host CPU: each block its own
    forward pass, ``g_B + lr / 4 * H_B (strength g_B)`` with the exact ``jvp``, then the mean."""
    model = _SmallConvNet()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(images, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=(images,)).astype(np.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    params = jax.tree.map(np.asarray, variables["params"])
    layout = block_layout(images, block_size)

    def loss_fn(p, model_state, inputs, labels):
        logits, new_state = model.apply(
            {"params": p, **model_state}, inputs, train=True, mutable=["batch_stats"]
        )
        loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])
        return loss, (new_state, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)})

    def batch_fn(data, indices, step):
        del step
        return data[0][indices], data[1][indices]

    penalty = gradient_norm_penalty(learning_rate=0.8, strength=0.5, method="jvp")
    state = {"batch_stats": jax.tree.map(np.asarray, variables["batch_stats"])}
    mesh = data_mesh()
    engine = FullBatchGradient(
        loss_fn,
        batch_fn,
        mesh=mesh,
        penalty=penalty,
        blocks_per_microbatch=2,
        microbatch_loop="scan",
        block_loop="vmap",
        batchnorm_statistics="mean",
    )
    result = engine(
        replicate(params, mesh),
        replicate(state, mesh),
        replicate(penalty.init(params), mesh),
        replicate((x, y), mesh),
        layout,
        0,
    )
    actual = ravel_pytree(fetch_replicated(result.grads))[0]
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        p64 = jax.tree.map(jnp.float64, params)
        state64 = jax.tree.map(jnp.float64, state)
        total = None
        for block in layout:
            inputs, labels = jnp.float64(x[block]), jnp.asarray(y[block])

            def grad_fn(p, inputs=inputs, labels=labels):
                return jax.grad(lambda q: loss_fn(q, state64, inputs, labels)[0])(p)

            grads = grad_fn(p64)
            penalized = penalized_gradient(
                grad_fn, p64, grads, strength=0.5, learning_rate=0.8, method="jvp"
            )
            flat = ravel_pytree(penalized)[0]
            total = flat if total is None else total + flat
        expected = np.asarray(total / len(layout))
    return relative_error(actual, expected)


# ----- 2. the yardstick -------------------------------------------------------------------


def peak_matmul_rate(size: int, dtype: str, repeats: int = 10) -> float:
    """FLOP/s of a ``size x size`` by ``size x size`` matrix product in ``dtype`` on the first
    device (``2 size^3`` operations each; the fastest of ``repeats`` calls after a compiling
    one), the yardstick of ``flop_fraction``."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    product = jax.jit(jnp.matmul)
    jax.block_until_ready(product(a, b))
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest


# ----- 3. and 4. the figures --------------------------------------------------------------


def parse_fields(line: str) -> dict[str, str]:
    """``a=1 b=x`` -> ``{"a": "1", "b": "x"}``."""
    return dict(re.findall(r"(\w+)=(\S+)", line))


#: The environment this command was started with (see :func:`main`).
_PARENT_ENVIRONMENT: dict[str, str] = {}


def _run(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Runs a command of the check; its stdout, or a one-line error naming it (exit 1)."""
    environment = {**(_PARENT_ENVIRONMENT or os.environ), **(env or {})}
    result = subprocess.run(
        list(command), capture_output=True, text=True, env=environment, check=False, timeout=360
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        # The tail of the failed command's own output, for the one look a GPU slot allows.
        print("\n".join(f"  | {line}" for line in lines[-20:]), file=sys.stderr, flush=True)
        last = lines[-1]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({result.returncode}): {last}")
    return result.stdout


def _bench(sizes: Sizes, config: str, dtype: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gdreg.tools.bench",
        f"--config=configs/resnet18_fb.py:{config}",
        f"--config.model.name={sizes.model}",
        f"--config.model.width={sizes.width}",
        f"--config.model.dtype={dtype}",
        f"--config.data.synthetic_shape=({','.join(map(str, sizes.shape))})",
        f"--images={sizes.images}",
        *extra,
    ]


def full_batch_figures(
    sizes: Sizes, dtype: str, budget: float | None, steps: int
) -> dict[str, str]:
    """The regularized step in ``dtype`` (``gdreg.tools.bench``'s fields): in the autotuner's
    choice within ``budget`` seconds, timed alone in a fresh process; with ``budget`` None in
    the backend's default shape, without a sweep (a GPU's: 4 blocks per call, a Python loop
    over calls, the blocks unrolled, what the tuner chose on an H200; the CPU's: one block)."""
    step = _bench(sizes, "regularized", dtype, f"--config.train.block_size={sizes.block}")
    shape = []
    if budget is not None:
        sweep = _run([*step, "--sweep", f"--config.train.autotune_seconds={budget}"])
        # The candidates' times, as comments: what the tuner saw is worth a look on a new GPU.
        print("\n".join(f"# {line}" for line in sweep.splitlines()), flush=True)
        chosen = parse_fields(
            next(line for line in sweep.splitlines() if line.startswith("chosen"))
        )
        shape = [
            f"--config.train.{field}={chosen[field]}"
            for field in ("blocks_per_microbatch", "microbatch_loop", "block_loop")
        ]
    lines = _run([*step, *shape, f"--steps={steps}"]).strip().splitlines()
    return parse_fields(lines[-1])


def sgd_figures(sizes: Sizes, dtype: str, steps: int) -> dict[str, str]:
    """An epoch of the SGD baseline at batch ``sizes.sgd_batch`` in ``dtype``."""
    command = _bench(
        sizes, "sgd", dtype, f"--config.train.batch_size={sizes.sgd_batch}", f"--steps={steps}"
    )
    return parse_fields(_run(command).strip().splitlines()[-1])


def reference_figures(
    peer: str, sizes: Sizes, *, amp: bool, sgd: bool, steps: int, device: str
) -> dict[str, str]:
    """The reference implementation's step (or SGD epoch) on the same network and sizes."""
    command = [
        sys.executable,
        os.path.join(peer, "reference_step.py"),
        "--depth=18",
        f"--width={sizes.width}",
        f"--images={sizes.images}",
        f"--block={sizes.sgd_batch if sgd else sizes.block}",
        f"--steps={steps}",
        f"--device={device}",
        *(["--amp"] if amp else []),
        *(["--sgd"] if sgd else []),
    ]
    return parse_fields(_run(command, env={"AUTHORS_DIR": peer}).strip())


def summary_table(figures: dict[str, float | str], device_kind: str, sizes: Sizes) -> str:
    """The table of GPU figures of docs/performance.md."""

    def cell(name: str, digits: str = ".3g") -> str:
        value = figures.get(name)
        return format(value, digits) if isinstance(value, float) else "n/a"

    rows = [
        (f"regularized step, blocks of {sizes.block} (s)", "fb_{}_seconds_per_step", ".3g"),
        ("images per second", "fb_{}_images_per_second", ".4g"),
        ("peak memory (GB)", "fb_{}_peak_memory_gb", ".3g"),
        ("fraction of measured peak FLOP rate", "fb_{}_flop_fraction", ".2f"),
        ("reference's step (s)", "reference_fb_{}_seconds_per_step", ".3g"),
        ("reference's peak memory (GB)", "reference_fb_{}_peak_memory_gb", ".3g"),
        ("reference / gdreg", "ratio_fb_{}", ".2f"),
        (f"SGD, batch {sizes.sgd_batch} (images/s)", "sgd_{}_images_per_second", ".4g"),
        ("reference's SGD (images/s)", "reference_sgd_{}_images_per_second", ".4g"),
        ("gdreg / reference, SGD", "ratio_sgd_{}", ".2f"),
    ]
    lines = [
        f"| {sizes.model} (width {sizes.width}), {sizes.images:,} images, one {device_kind} "
        "| bfloat16 | float32 |",
        "|---|---|---|",
    ]
    for title, pattern, digits in rows:
        lines.append(
            f"| {title} | {cell(pattern.format('bfloat16'), digits)} | "
            f"{cell(pattern.format('float32'), digits)} |"
        )
    return "\n".join(lines)


def _number(value: str | None) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return "n/a"


def run_check(
    sizes: Sizes, *, peer: str | None, budget: float, steps: int, dtypes: Sequence[str]
) -> int:
    """All four parts; the exit status (1 if the device computes something else, or a figure
    failed). On a CPU the loop shape is not timed (the CPU's best one is known).

    A GPU slot is short and often used once, so a figure that fails (a step out of memory, a
    reference that does not start) is reported on its own ``error:`` line and the others are
    still measured; each dtype's figures come with the reference's beside them, so that a run
    cut short by the slot's end still holds comparable pairs."""
    started = time.perf_counter()
    device = jax.devices()[0]
    emit("device_kind", device.device_kind.replace(" ", "_"))
    emit("jax_version", jax.__version__)
    for name, check in (("check_penalty", check_penalty), ("check_engine", check_engine)):
        error = check()
        emit(f"{name}_relative_error", error)
        if not error <= TOLERANCE:
            print(
                f"error: {name}: the device's result differs from float64 by {error:.3g} "
                f"(relative; allowed {TOLERANCE}): no timing of a wrong computation",
                file=sys.stderr,
            )
            return 1
    figures: dict[str, float | str] = {}
    failed: list[str] = []

    def measure(name: str, part: Any) -> dict[str, str]:
        try:
            return part()
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            failed.append(name)
            print(f"error: {name}: {error}", file=sys.stderr, flush=True)
            return {}
        finally:
            emit(f"elapsed_s_after_{name}", round(time.perf_counter() - started, 1))

    def record(names: Sequence[str]) -> None:
        for name in names:
            if name in figures:
                emit(name, figures[name])

    tuned = jax.default_backend() != "cpu"

    def measure_reference(dtype: str, *, sgd: bool) -> dict[str, str]:
        # The reference's mixed precision is float16 autocast: its counterpart of bfloat16.
        return measure(
            f"reference_{'sgd' if sgd else 'fb'}_{dtype}",
            lambda: reference_figures(
                peer,
                sizes,
                amp=dtype != "float32",
                sgd=sgd,
                steps=steps,
                device="cuda" if tuned else "cpu",
            ),
        )

    for dtype in dtypes:
        rate = peak_matmul_rate(sizes.matmul, dtype)
        figures[f"peak_matmul_tflops_{dtype}"] = rate / 1e12
        record([f"peak_matmul_tflops_{dtype}"])
        fb = measure(
            f"fb_{dtype}",
            lambda dtype=dtype: full_batch_figures(
                sizes, dtype, budget / len(dtypes) if tuned and budget > 0 else None, steps
            ),
        )
        seconds = _number(fb.get("seconds_per_step"))
        flop = _number(fb.get("tflop_per_step"))
        figures[f"fb_{dtype}_seconds_per_step"] = seconds
        figures[f"fb_{dtype}_images_per_second"] = _number(fb.get("images_per_second"))
        memory = _number(fb.get("peak_memory_mb"))
        figures[f"fb_{dtype}_peak_memory_gb"] = (
            memory / 1024 if isinstance(memory, float) else memory
        )
        if isinstance(flop, float) and isinstance(seconds, float):
            figures[f"fb_{dtype}_flop_fraction"] = flop * 1e12 / seconds / rate
        figures[f"fb_{dtype}_loop_shape"] = "{}/{}/{}".format(
            fb.get("blocks_per_microbatch"), fb.get("microbatch_loop"), fb.get("block_loop")
        )
        record([k for k in figures if k.startswith(f"fb_{dtype}_")])
        if peer:
            theirs = measure_reference(dtype, sgd=False)
            reference_seconds = _number(theirs.get("seconds_per_step"))
            figures[f"reference_fb_{dtype}_seconds_per_step"] = reference_seconds
            figures[f"reference_fb_{dtype}_peak_memory_gb"] = _number(theirs.get("peak_memory_gb"))
            if isinstance(seconds, float) and isinstance(reference_seconds, float):
                figures[f"ratio_fb_{dtype}"] = reference_seconds / seconds
            record(
                [k for k in figures if k.startswith((f"reference_fb_{dtype}", f"ratio_fb_{dtype}"))]
            )
        sgd = measure(f"sgd_{dtype}", lambda dtype=dtype: sgd_figures(sizes, dtype, steps))
        ours_sgd = _number(sgd.get("images_per_second"))
        figures[f"sgd_{dtype}_images_per_second"] = ours_sgd
        record([f"sgd_{dtype}_images_per_second"])
        if peer:
            theirs = measure_reference(dtype, sgd=True)
            theirs_sgd = _number(theirs.get("images_per_second"))
            figures[f"reference_sgd_{dtype}_images_per_second"] = theirs_sgd
            if isinstance(ours_sgd, float) and isinstance(theirs_sgd, float):
                figures[f"ratio_sgd_{dtype}"] = ours_sgd / theirs_sgd
            record([f"reference_sgd_{dtype}_images_per_second", f"ratio_sgd_{dtype}"])
    print(summary_table(figures, device.device_kind, sizes), flush=True)
    if failed:
        print(f"error: {len(failed)} figure(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return exitcodes.DONE


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    # This process only checks and multiplies small matrices while the timed steps run in
    # subprocesses: without this, JAX's default would hold 75% of the GPU's memory here and
    # leave the steps a quarter of it. The subprocesses get the user's own setting back.
    _PARENT_ENVIRONMENT.update(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # After a sweep (--budget_seconds > 0) the timed run of the chosen shape compiles what the
    # sweep compiled a moment before, in another process (40 to 60 s for ResNet-18 on an
    # H200): JAX's persistent cache, in a folder of this check's own unless the user names
    # one, lets it load that instead. Without a sweep nothing is compiled twice.
    if "JAX_COMPILATION_CACHE_DIR" in _PARENT_ENVIRONMENT or FLAGS.budget_seconds <= 0:
        return _checked()
    with tempfile.TemporaryDirectory(prefix="gdreg-gpu-check-cache-") as cache:
        _PARENT_ENVIRONMENT["JAX_COMPILATION_CACHE_DIR"] = cache
        return _checked()


def _checked() -> int:
    """:func:`main` past its set-up: the input checked, then :func:`run_check`."""
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and not FLAGS.allow_cpu:
        print(
            "error: JAX sees no GPU here (backend cpu); run on a GPU node, or pass --allow_cpu "
            "(ALLOW_CPU=1 for launch/gpu_check.sh) for the toy-sized CPU form",
            file=sys.stderr,
        )
        return exitcodes.BAD_INPUT
    if FLAGS.peer and not os.path.isfile(os.path.join(FLAGS.peer, "reference_step.py")):
        print(f"error: --peer {FLAGS.peer}: no reference_step.py there", file=sys.stderr)
        return exitcodes.BAD_INPUT
    unknown = sorted(set(FLAGS.dtypes) - set(DTYPES))
    if unknown:
        print(f"error: --dtypes: {', '.join(unknown)} not one of {DTYPES}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    sizes = CPU_SIZES if on_cpu else GPU_SIZES
    if FLAGS.images:
        sizes = dataclasses.replace(sizes, images=FLAGS.images)
    try:
        return run_check(
            sizes,
            peer=FLAGS.peer,
            budget=FLAGS.budget_seconds,
            steps=FLAGS.steps,
            dtypes=FLAGS.dtypes,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run() -> None:
    """Console entry point (``python -m gdreg.tools.gpu_check``)."""
    _define_flags()
    cli.run_command(main, __doc__)


if __name__ == "__main__":
    run()
