"""The gradient-norm penalty for Flax NNX models, whose calls change their own state.

:func:`nnx_value_and_penalized_grad` is :func:`gdreg.value_and_penalized_grad` for an NNX model
(BatchNorm statistics, dropout RNG counters live in the model, or in an ``nnx.Rngs`` passed at
call time); Geiping et al., ICLR 2022 (arXiv 2109.14119).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.nnx import filterlib, graph

from gdreg.penalty.dropin import value_and_penalized_grad

__all__ = ["nnx_value_and_penalized_grad"]


def _filter_of(argnums: int | nnx.DiffState, wrt: filterlib.Filter) -> filterlib.Filter:
    """The filter of the model's variables to differentiate, from ``argnums`` or ``wrt``."""
    if isinstance(argnums, nnx.DiffState):
        if argnums.argnum != 0:
            raise ValueError(
                "nnx_value_and_penalized_grad differentiates its first argument, the model: "
                f"got argnums=nnx.DiffState({argnums.argnum}, ...); put the model first"
            )
        if wrt is not nnx.Param and wrt != argnums.filter:
            raise ValueError(
                "the filter is given twice (wrt= and argnums=nnx.DiffState(0, ...)): give one"
            )
        return argnums.filter
    if argnums != 0:
        raise ValueError(
            "nnx_value_and_penalized_grad differentiates its first argument, the model: got "
            f"argnums={argnums!r}; for a subset of the model's variables pass "
            "argnums=nnx.DiffState(0, <filter>) or wrt=<filter>"
        )
    return wrt


def nnx_value_and_penalized_grad(
    loss_fn: Callable[..., Any],
    *,
    learning_rate: optax.ScalarOrSchedule | None,
    strength: optax.ScalarOrSchedule = 0.5,
    method: str = "jvp",
    eps: float = 1e-2,
    has_aux: bool = False,
    axis_name: str | None = None,
    check: bool = True,
    wrt: filterlib.Filter = nnx.Param,
    argnums: int | nnx.DiffState = 0,
) -> Callable[..., tuple[Any, nnx.State]]:
    """:func:`gdreg.value_and_penalized_grad` for ``loss_fn(model, *args, **kwargs)`` on NNX.

    A drop-in for ``nnx.value_and_grad(loss_fn, has_aux=..., argnums=...)``. The returned
    ``f(model, *args, step=None, learning_rate=None, **kwargs)`` returns ``(value, grads)``
    with ``grads`` an ``nnx.State`` of the model's ``wrt`` variables (ready for
    ``nnx.Optimizer.update(model, grads)``), the gradient of
    ``L + strength * lr / 8 * ||grad_wrt L||^2`` (Geiping et al., ICLR 2022): the penalty is
    the gradient norm over the differentiated variables only, as gradient descent on those
    alone regularizes implicitly. Every evaluation of the loss (the gradient and the
    penalty's perturbed ones) starts from the same snapshot of the model's other state and of
    NNX objects among the arguments (an ``nnx.Rngs`` passed at call time, as Flax's MNIST
    tutorial does), so dropout draws the same masks in all of them and BatchNorm normalizes
    with the same batch; afterwards the model and those objects hold the state of the
    unperturbed evaluation only, exactly as after one plain call of ``loss_fn`` (BatchNorm
    running statistics move once, RNG counters advance once).

    Args:
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with
        ``has_aux``), the model in training mode. NNX objects among ``args`` and ``kwargs``
        are not differentiated.
      learning_rate, strength, method, eps, has_aux, axis_name, check: as for
        :func:`gdreg.value_and_penalized_grad` (``method="jvp"``, exact, by default).
      wrt: the NNX filter of the model's variables to differentiate (``nnx.Param``). When the
        optimizer trains a subset (``nnx.Optimizer(model, tx, wrt=f)``, fine-tuning), give the
        same filter: ``nnx.Optimizer`` silently drops gradients outside its ``wrt``, and a
        penalty over all parameters would not be the trained subset's.
      argnums: 0, or ``nnx.DiffState(0, filter)`` as for ``nnx.value_and_grad`` (the same as
        ``wrt=filter``).

    Returns:
      The function described above.

    Raises:
      ValueError: for ``argnums`` other than the model, a filter given twice, and what
        :func:`gdreg.value_and_penalized_grad` raises.
    """
    trained = filterlib.to_predicate(_filter_of(argnums, wrt))

    def differentiated(path: tuple, value: Any) -> bool:
        # Only the model's own variables (position 0 of the split tuple) are differentiated.
        return bool(path) and path[0] == 0 and trained(path[1:], value)

    def pure_loss(params, graphdef, rest, plain, *, layout):
        # A fresh model (and fresh argument objects) from the snapshot for every evaluation:
        # nothing one evaluation does to their state (RNG counters, batch statistics) is seen
        # by the next.
        model, *objects = nnx.merge(graphdef, params, rest, copy=True)
        args, kwargs = layout.rebuild(plain, objects)
        out = loss_fn(model, *args, **kwargs)
        value, aux = out if has_aux else (out, None)
        _, _, new_rest = nnx.split((model, *objects), differentiated, ...)
        return value, (aux, new_rest)

    settings = {
        "learning_rate": learning_rate,
        "strength": strength,
        "method": method,
        "eps": eps,
        "has_aux": True,
        "axis_name": axis_name,
        "check": check,
    }
    value_and_penalized_grad(pure_loss, **settings)  # the argument checks, at construction

    def value_and_grads(model, *args, step=None, learning_rate=None, **kwargs):
        layout = _Layout(args, kwargs)
        graphdef, params, rest = nnx.split((model, *layout.objects), differentiated, ...)
        penalized = value_and_penalized_grad(
            functools.partial(pure_loss, layout=layout), **settings
        )
        (value, (aux, new_rest)), grads = penalized(
            params, graphdef, rest, layout.plain, step=step, learning_rate=learning_rate
        )
        nnx.update((model, *layout.objects), new_rest)
        # The split tuple's position 0: the model's variables, shaped like nnx.state(model, wrt).
        return ((value, aux) if has_aux else value), grads[0]

    return value_and_grads


class _Layout:
    """The call's arguments, split into NNX objects and everything else (plain values).

    The objects travel as part of the model's snapshot; the plain values as arguments of the
    differentiated function.
    """

    def __init__(self, args: tuple, kwargs: dict):
        leaves, self.treedef = jax.tree.flatten((args, kwargs), is_leaf=graph.is_graph_node)
        self.is_object = tuple(graph.is_graph_node(leaf) for leaf in leaves)
        self.objects = [leaf for leaf, obj in zip(leaves, self.is_object, strict=True) if obj]
        self.plain = [leaf for leaf, obj in zip(leaves, self.is_object, strict=True) if not obj]

    def rebuild(self, plain: list, objects: list) -> tuple[tuple, dict]:
        plain, objects = iter(plain), iter(objects)
        leaves = [next(objects) if obj else next(plain) for obj in self.is_object]
        return jax.tree.unflatten(self.treedef, leaves)
