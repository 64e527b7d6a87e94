"""Where a CPU training step's time goes, layer by layer, beside PyTorch on the same machine.

    python -m gdreg.tools.layer_profile --width 64 --images 32

Times, on one core (``--threads 1``: XLA and PyTorch each on one thread, as gdreg runs one JAX
device per core), every distinct layer of the CIFAR ResNet-18 at ``--width`` on a block of
``--images`` images: each convolution's forward pass, its input gradient and its filter
gradient (gdreg's :func:`gdreg.models.layers.conv_general_dilated`, the one the models use;
PyTorch's ``conv2d``, what the reference implementation runs), BatchNorm with ReLU forward and
backward at each activation size, and the optimizer update (weight decay, Nesterov momentum)
over the network's parameter count; then the same matrix product in both as a yardstick. Each
row is the fastest of ``--repeats`` timed calls after a compiling one, times the number of
such layers in the network; a last line sums them. Without PyTorch installed (the ``torch``
extra) only gdreg's columns are filled.

Then gdreg's whole network, one forward and backward pass of the block as training runs it,
timed and traced (``jax.profiler``): where XLA spends the pass by kind of operation
(convolutions, layout transposes, elementwise, reductions), which is what the network adds
between its layers.

Prints one ``name=value`` line per row and the two tables of docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable

from absl import flags

from gdreg.program import cli, exitcodes

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_integer("width", 64, "ResNet-18 width (64: the paper's).", lower_bound=1)
    flags.DEFINE_integer("images", 32, "Images per block.", lower_bound=1)
    flags.DEFINE_integer("size", 32, "Image height and width.", lower_bound=4)
    flags.DEFINE_integer("threads", 1, "Threads for XLA and PyTorch (1: one core).", lower_bound=1)
    flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.", lower_bound=1)


@dataclasses.dataclass(frozen=True)
class Layer:
    """``count`` layers of one shape: a ``kernel`` x ``kernel`` convolution from ``size`` x
    ``size`` x ``channels_in`` images (NHWC) to ``channels_out`` channels at ``stride``."""

    size: int
    channels_in: int
    channels_out: int
    kernel: int
    stride: int
    count: int

    def describe(self) -> str:
        return (
            f"conv{self.kernel}x{self.kernel} {self.size}x{self.size}x{self.channels_in}"
            f"->{self.channels_out}" + (f" stride {self.stride}" if self.stride > 1 else "")
        )


def resnet18_layers(width: int, size: int) -> list[Layer]:
    """The convolutions of the CIFAR ResNet-18 (He et al., 2016; the reference's CIFAR stem and
    1x1 strided shortcuts): a 3x3 stem, then four stages of two basic blocks at widths
    ``w, 2w, 4w, 8w``, each later stage halving the image size."""
    layers = [Layer(size, 3, width, 3, 1, 1), Layer(size, width, width, 3, 1, 4)]
    channels = width
    for _ in range(3):
        layers += [
            Layer(size, channels, 2 * channels, 3, 2, 1),
            Layer(size // 2, 2 * channels, 2 * channels, 3, 1, 3),
            Layer(size, channels, 2 * channels, 1, 2, 1),
        ]
        channels, size = 2 * channels, size // 2
    return layers


def fastest_ms(function: Callable[[], object], repeats: int) -> float:
    """Milliseconds of the fastest of ``repeats`` calls of ``function`` after a first one."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def jax_times(layer: Layer, images: int, repeats: int) -> dict[str, float]:
    """gdreg's convolution of ``layer``: forward, forward with the input gradient, forward with
    the filter gradient, all three (milliseconds)."""
    import jax
    import jax.numpy as jnp

    from gdreg.models.layers import conv_general_dilated

    pad = layer.kernel // 2
    numbers = ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        strides = (layer.stride, layer.stride)
        return conv_general_dilated(x, w, strides, ((pad, pad), (pad, pad)), None, None, numbers)

    def loss(x, w):
        return jnp.sum(jnp.square(conv(x, w)))

    key = jax.random.key(0)
    x = jax.random.normal(key, (images, layer.size, layer.size, layer.channels_in))
    kernel_shape = (layer.kernel, layer.kernel, layer.channels_in, layer.channels_out)
    w = 0.05 * jax.random.normal(key, kernel_shape)
    calls = {
        "fwd": jax.jit(conv),
        "fwd_dx": jax.jit(jax.grad(loss, argnums=0)),
        "fwd_dw": jax.jit(jax.grad(loss, argnums=1)),
        "fwd_dx_dw": jax.jit(jax.grad(loss, argnums=(0, 1))),
    }
    return {
        name: fastest_ms(lambda f=f: jax.block_until_ready(f(x, w)), repeats)
        for name, f in calls.items()
    }


def jax_batch_norm_ms(shape: tuple[int, int, int, int], repeats: int) -> float:
    """The models' own BatchNorm layer in training mode (batch statistics), then a ReLU, forward
    and backward on an NHWC ``shape`` (milliseconds)."""
    import jax
    import jax.numpy as jnp

    from gdreg.models.layers import BatchNorm

    norm = BatchNorm(use_running_average=False)
    key = jax.random.key(0)
    y = jax.random.normal(key, shape)
    statistics = norm.init(key, y)["batch_stats"]
    ones = jnp.ones((shape[-1],))

    def batch_norm_relu(y, scale, bias):
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": statistics}
        normalized, _ = norm.apply(variables, y, mutable=["batch_stats"])
        return jnp.sum(jax.nn.relu(normalized))

    step = jax.jit(jax.grad(batch_norm_relu, argnums=(0, 1, 2)))
    return fastest_ms(lambda: jax.block_until_ready(step(y, ones, ones)), repeats)


def torch_times(layer: Layer, images: int, repeats: int) -> dict[str, float] | None:
    """PyTorch's ``conv2d`` (NCHW, as the reference runs it) of ``layer``: forward, and forward
    with both gradients (milliseconds); None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    x = torch.randn(images, layer.channels_in, layer.size, layer.size, requires_grad=True)
    w = (
        0.05 * torch.randn(layer.channels_out, layer.channels_in, layer.kernel, layer.kernel)
    ).requires_grad_()
    pad = layer.kernel // 2

    def forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, stride=layer.stride, padding=pad)

    def both():
        torch.nn.functional.conv2d(x, w, stride=layer.stride, padding=pad).square().sum().backward()

    return {"fwd": fastest_ms(forward, repeats), "fwd_dx_dw": fastest_ms(both, repeats)}


def torch_batch_norm_ms(shape: tuple[int, int, int, int], repeats: int) -> float | None:
    """PyTorch's ``batch_norm`` in training mode and a ReLU, forward and backward, on the
    NHWC ``shape`` laid out as NCHW (milliseconds); None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    images, size, _, channels = shape
    y = torch.randn(images, channels, size, size, requires_grad=True)
    scale = torch.ones(channels, requires_grad=True)
    bias = torch.ones(channels, requires_grad=True)

    def step():
        normalized = torch.nn.functional.batch_norm(y, None, None, scale, bias, training=True)
        torch.relu(normalized).sum().backward()

    return fastest_ms(step, repeats)


def update_times(parameters: int, repeats: int) -> tuple[float, float | None]:
    """Milliseconds of one update (weight decay 5e-4, Nesterov momentum 0.9) of ``parameters``
    float32 values: gdreg's optax chain, and ``torch.optim.SGD`` where PyTorch is installed."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9, nesterov=True))
    params = jnp.ones((parameters,))
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    ours = fastest_ms(lambda: jax.block_until_ready(step(params, state, params)), repeats)
    try:
        import torch
    except ImportError:
        return ours, None
    weights = torch.nn.Parameter(torch.ones(parameters))
    weights.grad = torch.ones(parameters)
    optimizer = torch.optim.SGD([weights], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return ours, fastest_ms(optimizer.step, repeats)


def matmul_rates(repeats: int) -> tuple[float, float | None]:
    """GFLOP/s of a 512 x 4608 by 4608 x 512 float32 product (the deepest 3x3 layer's im2col
    shape at width 64): XLA's, and PyTorch's where installed."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((512, 4608)), jnp.ones((4608, 512))
    product = jax.jit(jnp.matmul)
    flop = 2 * 512 * 4608 * 512
    ours = flop / fastest_ms(lambda: jax.block_until_ready(product(a, b)), repeats) / 1e6
    try:
        import torch
    except ImportError:
        return ours, None
    ta, tb = torch.ones(512, 4608), torch.ones(4608, 512)
    return ours, flop / fastest_ms(lambda: ta @ tb, repeats) / 1e6


#: What a compiled instruction does, by the first of these operations found in it (fusions
#: included): the kinds of :func:`whole_pass`'s breakdown.
OPERATION_KINDS = {
    "convolution": "convolutions",
    "dot": "matrix_products",
    "transpose": "transposes",
    "copy": "transposes",
    "reduce": "reductions",
    "reduce-window": "reductions",
}
OTHER_KIND = "elementwise"
KIND_LABELS = {
    "convolutions": "convolutions (forward, input and filter gradients)",
    "transposes": "layout transposes and copies",
    "elementwise": "elementwise (BatchNorm, ReLU, residual sums)",
    "reductions": "reductions (BatchNorm statistics, pooling, the loss)",
    "matrix_products": "matrix products (the classifier)",
}

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")


def operation_kinds(hlo_text: str) -> dict[str, str]:
    """The kind (:data:`OPERATION_KINDS`) of every instruction of a compiled module's text, by
    name: what its opcode is, or for a fusion the first kind found among the operations of the
    computations it calls (the order of :data:`OPERATION_KINDS`: a fusion that transposes an
    activation computed from elementwise operations counts as a transpose)."""
    opcodes: dict[str, set[str]] = {}  # per computation: its opcodes and those it calls
    calls: dict[str, set[str]] = {}
    instructions: dict[str, tuple[str, set[str]]] = {}
    computation = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            opcodes[computation], calls[computation] = set(), set()
            continue
        match = _INSTRUCTION.match(line)
        if not match or not computation:
            continue
        called = set(_CALLED.findall(line))
        opcodes[computation].add(match.group(2))
        calls[computation] |= called
        instructions[match.group(1)] = (match.group(2), called)

    def reachable(names: set[str], seen: set[str]) -> set[str]:
        found: set[str] = set()
        for name in names - seen:
            seen.add(name)
            found |= opcodes.get(name, set()) | reachable(calls.get(name, set()), seen)
        return found

    kinds = {}
    for name, (opcode, called) in instructions.items():
        found = {opcode} | reachable(called, set())
        kinds[name] = next(
            (kind for op, kind in OPERATION_KINDS.items() if op in found), OTHER_KIND
        )
    return kinds


def whole_pass(
    width: int, images: int, size: int, repeats: int
) -> tuple[float, dict[str, tuple[float, int]]]:
    """gdreg's ResNet-18 itself (:func:`gdreg.models.create_model`, the training loss of
    :func:`gdreg.engine.objective.make_loss_fn`): the milliseconds of one forward and backward
    pass of a block in training mode (fastest of ``repeats``), and where XLA spends them,
    ``{kind: (milliseconds, operations)}`` per pass from a ``jax.profiler`` trace of
    ``repeats`` passes, by :func:`operation_kinds`. The difference from the sum of the layers
    is what the network adds between them (XLA's layout changes, fusions)."""
    import jax
    import jax.numpy as jnp

    from gdreg.engine.objective import make_loss_fn
    from gdreg.models import create_model

    model = create_model("resnet18", num_classes=10, width=width)
    key_images, key_init = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(key_images, (images, size, size, 3))
    labels = jnp.arange(images) % 10
    variables = model.init(key_init, inputs[:1], train=False)
    params = variables["params"]
    model_state = {name: value for name, value in variables.items() if name != "params"}
    arguments = (params, model_state, inputs, labels)
    # Compiled once: the program timed and traced is the one whose text names the operations.
    step = jax.jit(jax.value_and_grad(make_loss_fn(model), has_aux=True))
    step = step.lower(*arguments).compile()
    milliseconds = fastest_ms(lambda: jax.block_until_ready(step(*arguments)), repeats)
    kinds = operation_kinds(step.as_text())
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="gdreg-layer-profile-") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(step(*arguments))
        (trace,) = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace, "rt") as file:
            events = json.load(file)
    for event in events["traceEvents"] if isinstance(events, dict) else events:
        kind = kinds.get(event.get("name", ""))
        if event.get("ph") == "X" and kind:
            total = totals.setdefault(kind, [0.0, 0])
            total[0] += event.get("dur", 0) / 1e3 / repeats
            total[1] += 1
    breakdown = {kind: (ms, round(count / repeats)) for kind, (ms, count) in totals.items()}
    return milliseconds, dict(sorted(breakdown.items(), key=lambda item: -item[1][0]))


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(theirs: float | None, ours: float, digits: int = 2) -> str:
    """PyTorch's time over gdreg's ("n/a" without PyTorch)."""
    return _cell(None if theirs is None else theirs / ours, digits)


def profile(width: int, images: int, size: int, repeats: int) -> list[str]:
    """The rows (``name=value`` lines) and the markdown table, as lines."""
    lines, table = [], []
    totals = {"gdreg": 0.0, "torch": 0.0}
    torch_missing = False
    table += [
        f"| ResNet-18 width {width}, {images} images of {size}x{size} | count | gdreg forward "
        "| + input grad | + filter grad | gdreg all | torch forward | torch all | torch / gdreg |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    normalized: dict[tuple[int, int], int] = {}  # BatchNorm layers by output size
    for layer in resnet18_layers(width, size):
        ours = jax_times(layer, images, repeats)
        theirs = torch_times(layer, images, repeats)
        torch_missing |= theirs is None
        totals["gdreg"] += layer.count * ours["fwd_dx_dw"]
        if theirs:
            totals["torch"] += layer.count * theirs["fwd_dx_dw"]
        input_grad = ours["fwd_dx"] - ours["fwd"]
        filter_grad = ours["fwd_dw"] - ours["fwd"]
        lines.append(
            f"layer={layer.describe().replace(' ', '_')} count={layer.count} "
            f"gdreg_fwd_ms={ours['fwd']:.4f} gdreg_input_grad_ms={input_grad:.4f} "
            f"gdreg_filter_grad_ms={filter_grad:.4f} gdreg_all_ms={ours['fwd_dx_dw']:.4f} "
            f"torch_fwd_ms={_cell(theirs and theirs['fwd'], 4)} "
            f"torch_all_ms={_cell(theirs and theirs['fwd_dx_dw'], 4)}"
        )
        table.append(
            f"| {layer.describe()} | {layer.count} | {ours['fwd']:.1f} | {input_grad:.1f} | "
            f"{filter_grad:.1f} | {ours['fwd_dx_dw']:.1f} | {_cell(theirs and theirs['fwd'])} | "
            f"{_cell(theirs and theirs['fwd_dx_dw'])} | "
            f"{_ratio(theirs and theirs['fwd_dx_dw'], ours['fwd_dx_dw'])} |"
        )
        # Each convolution is followed by a BatchNorm (and, but for the shortcuts, a ReLU).
        output = (layer.size // layer.stride, layer.channels_out)
        normalized[output] = normalized.get(output, 0) + layer.count
    for (output_size, channels), count in normalized.items():
        shape = (images, output_size, output_size, channels)
        ours_ms, theirs_ms = jax_batch_norm_ms(shape, repeats), torch_batch_norm_ms(shape, repeats)
        totals["gdreg"] += count * ours_ms
        totals["torch"] += count * (theirs_ms or 0.0)
        name = f"BatchNorm+ReLU {output_size}x{output_size}x{channels}"
        lines.append(
            f"layer={name.replace(' ', '_')} count={count} gdreg_all_ms={ours_ms:.4f} "
            f"torch_all_ms={_cell(theirs_ms, 4)}"
        )
        table.append(
            f"| {name}, forward and backward | {count} | | | | {ours_ms:.1f} | | "
            f"{_cell(theirs_ms)} | {_ratio(theirs_ms, ours_ms)} |"
        )
    parameters = sum(
        layer.count * layer.kernel**2 * layer.channels_in * layer.channels_out
        for layer in resnet18_layers(width, size)
    )
    ours_update, theirs_update = update_times(parameters, repeats)
    totals["gdreg"] += ours_update
    totals["torch"] += theirs_update or 0.0
    lines.append(
        f"layer=update count=1 parameters={parameters} gdreg_all_ms={ours_update:.4f} "
        f"torch_all_ms={_cell(theirs_update, 4)}"
    )
    table.append(
        f"| update of {parameters:,} weights (decay, Nesterov) | 1 | | | | {ours_update:.1f} | | "
        f"{_cell(theirs_update)} | {_ratio(theirs_update, ours_update)} |"
    )
    theirs_total = None if torch_missing else totals["torch"]
    lines.append(
        f"total gdreg_ms={totals['gdreg']:.4f} torch_ms={_cell(theirs_total, 4)} "
        f"torch_over_gdreg={_ratio(theirs_total, totals['gdreg'], 3)}"
    )
    table.append(
        f"| one forward and backward pass, all layers | | | | | {totals['gdreg']:.0f} | | "
        f"{_cell(theirs_total, 0)} | {_ratio(theirs_total, totals['gdreg'])} |"
    )
    ours_rate, theirs_rate = matmul_rates(repeats)
    lines.append(f"matmul_gflops gdreg={ours_rate:.1f} torch={_cell(theirs_rate)}")
    whole_lines, whole_table = whole_pass_lines(width, images, size, repeats)
    return [*lines, *whole_lines, "", *table, "", *whole_table]


def whole_pass_lines(
    width: int, images: int, size: int, repeats: int
) -> tuple[list[str], list[str]]:
    """:func:`whole_pass` as ``name=value`` lines (the pass, then one line per kind of
    operation) and as a markdown table."""
    milliseconds, breakdown = whole_pass(width, images, size, repeats)
    traced = sum(ms for ms, _ in breakdown.values())
    lines = [f"whole_pass gdreg_ms={milliseconds:.4f} traced_ms={traced:.4f}"]
    table = [
        f"| gdreg's ResNet-18 width {width}, one forward and backward pass, traced "
        "| operations | ms | share |",
        "|---|--:|--:|--:|",
    ]
    for kind, (ms, count) in breakdown.items():
        lines.append(f"operations kind={kind} ms={ms:.4f} count={count} share={ms / traced:.4f}")
        table.append(f"| {KIND_LABELS[kind]} | {count} | {ms:.1f} | {ms / traced:.1%} |")
    table.append(
        f"| all traced operations (the pass, timed alone: {milliseconds:.0f} ms) | | "
        f"{traced:.1f} | |"
    )
    return lines, table


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    if FLAGS.size % 8:
        print(
            f"error: --size {FLAGS.size}: must be a multiple of 8 (three halvings)", file=sys.stderr
        )
        return exitcodes.BAD_INPUT
    threads = FLAGS.threads
    # Before JAX starts its CPU client: one device whose Eigen pool has ``threads`` threads.
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=1"]
        + (["--xla_cpu_multi_thread_eigen=false"] if threads == 1 else [])
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import torch

        torch.set_num_threads(threads)
        # As the reference's timing does, and XLA by default: denormals flushed to zero.
        torch.set_flush_denormal(True)
    except ImportError:
        pass
    print("\n".join(profile(FLAGS.width, FLAGS.images, FLAGS.size, FLAGS.repeats)), flush=True)
    return exitcodes.DONE


def run() -> None:
    """Console entry point (``python -m gdreg.tools.layer_profile``)."""
    _define_flags()
    cli.run_command(main, __doc__)


if __name__ == "__main__":
    run()
