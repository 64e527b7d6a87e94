"""How far the paper's finite-difference penalty is from the exact one on a ReLU network.

Prints, for a gdreg model at initialization on random CIFAR-shaped images in float64, the norm
of the forward and central finite-difference products H g (the penalty's gradient, up to its
coefficient) relative to the exact forward-over-reverse product, for several step lengths eps.
The README's figures come from the defaults:

    .venv/bin/python docs/finite_differences_on_relu.py --model resnet18 --width 8
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from gdreg.models import create_model
from gdreg.penalty import hessian_vector_product


def ratios(model_name: str, width: int, images: int, size: int, eps_values: list[float]):
    """{(method, eps): ||finite-difference H g|| / ||exact H g||} at initialization."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((images, size, size, 3))
    y = rng.integers(0, 10, images)
    model = create_model(model_name, num_classes=10, width=width, dtype="float64")
    variables = jax.tree.map(
        lambda a: np.asarray(a, np.float64), model.init(jax.random.key(0), x[:2], train=False)
    )
    params, stats = variables["params"], variables["batch_stats"]

    def loss(p):
        logits, _ = model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

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
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    args = parser.parse_args()
    with jax.enable_x64(True):
        result = ratios(args.model, args.width, args.images, args.size, args.eps)
    for (method, eps), ratio in result.items():
        print(f"{method:8s} eps={eps:g}: ||H g|| / ||exact H g|| = {ratio:.2f}")


if __name__ == "__main__":
    main()
