"""How far the paper's finite-difference penalty is from the exact one on a ReLU network.

Prints, for a network at initialization in float64, the norm of the forward and central
finite-difference products H g (the penalty's gradient, up to its coefficient) relative to the
exact forward-over-reverse product (gdreg's default, ``method="jvp"``), for several step
lengths eps. The default network is the CNN of Flax's Linen MNIST example as rebuilt in
docs/loops/linen_mnist.py, on its digits (strokes on a zero background, like MNIST's): with
zero biases, the units that see only background sit exactly on ReLU's kink, where a forward
difference of gradients grows as 1/eps. ``--model resnet18 --width 8`` takes one of gdreg's
own models instead, on random images (slower: minutes on a CPU)::

    .venv/bin/python docs/finite_differences_on_relu.py
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from gdreg.penalty import hessian_vector_product


def _flax_mnist(images: int):
    """The Linen MNIST CNN at initialization on its digits: (loss of the parameters, params)."""
    loops = Path(__file__).parent / "loops"
    sys.path.insert(0, str(loops))  # its digits.py, as when the example runs by itself
    example = runpy.run_path(str(loops / "linen_mnist.py"))
    train, _ = example["get_datasets"]()
    x = np.asarray(train["image"][:images], np.float64)
    y = train["label"][:images]
    model = example["CNN"]()
    params = jax.tree.map(
        lambda a: np.asarray(a, np.float64), model.init(jax.random.key(0), x[:1])["params"]
    )

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss, params


def _gdreg_model(name: str, width: int, images: int, size: int):
    """One of gdreg's models (BatchNorm in training mode) on random CIFAR-shaped images."""
    from gdreg.models import create_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((images, size, size, 3))
    y = rng.integers(0, 10, images)
    model = create_model(name, num_classes=10, width=width, dtype="float64")
    variables = jax.tree.map(
        lambda a: np.asarray(a, np.float64), model.init(jax.random.key(0), x[:2], train=False)
    )
    params, stats = variables["params"], variables["batch_stats"]

    def loss(p):
        logits, _ = model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss, params


def ratios(loss, params, eps_values: list[float]) -> dict[tuple[str, float], float]:
    """{(method, eps): ||finite-difference H g|| / ||exact H g||} at ``params``."""
    grad_fn = jax.grad(loss)

    @jax.jit
    def products(p):
        g = grad_fn(p)
        exact = hessian_vector_product(grad_fn, p, g, method="jvp")
        differences = [
            hessian_vector_product(grad_fn, p, g, method=method, eps=eps, grads=g)
            for method in ("forward", "central")
            for eps in eps_values
        ]
        return exact, differences

    exact, differences = products(params)
    keys = [(method, eps) for method in ("forward", "central") for eps in eps_values]
    exact_norm = np.linalg.norm(ravel_pytree(exact)[0])
    return {
        key: float(np.linalg.norm(ravel_pytree(value)[0]) / exact_norm)
        for key, value in zip(keys, differences, strict=True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flax-mnist", help="flax-mnist, or a gdreg model")
    parser.add_argument("--width", type=int, default=8, help="gdreg models only")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="gdreg models: image size")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    args = parser.parse_args()
    with jax.enable_x64(True):
        if args.model == "flax-mnist":
            loss, params = _flax_mnist(args.images)
        else:
            loss, params = _gdreg_model(args.model, args.width, args.images, args.size)
        result = ratios(loss, params, args.eps)
    for (method, eps), ratio in result.items():
        print(f"{method:8s} eps={eps:g}: ||H g|| / ||exact H g|| = {ratio:.2f}")


if __name__ == "__main__":
    main()
