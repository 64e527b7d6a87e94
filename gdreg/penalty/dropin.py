"""A drop-in for ``jax.value_and_grad`` that returns the gradient with the penalty added.

Geiping et al. (ICLR 2022, arXiv 2109.14119): the gradient of
``L + strength * lr / 8 * ||grad L||^2`` on one batch, computed from that batch alone
(:func:`gdreg.penalty.hessian.penalized_gradient`), so whatever optimizer, clipping, masking or
accumulation follows receives a correct gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from gdreg.penalty.hessian import (
    PyTree,
    _at_step,
    _check_method,
    _check_number,
    _is_float,
    _mean_over,
    _varying,
    _varying_axes,
    penalized_gradient,
)


def _check_consumed_keywords(loss_fn: Callable[..., Any]) -> None:
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # no signature to inspect
        return
    clash = [
        name
        for name in ("step", "learning_rate")
        if name in parameters and parameters[name].kind != inspect.Parameter.POSITIONAL_ONLY
    ]
    if clash:
        raise ValueError(
            f"loss_fn takes {' and '.join(clash)}, which the penalized function consumes as its "
            "own keyword arguments; wrap loss_fn so that it takes them under other names"
        )


def _check_device_local(params: PyTree, value: jax.Array, axis_name: str) -> None:
    """Rejects a loss already averaged over ``axis_name`` (shard_map's checks make it visible).

    Differentiating the mean over devices at device-varying parameters gives each device
    1/N of its gradient; the mean taken afterwards would then be N times too small.
    """
    floating = [leaf for leaf in jax.tree.leaves(params) if _is_float(leaf)]
    if not floating or axis_name not in (_varying_axes(floating[0]) or ()):
        return  # varying axes not tracked (pmap, check_vma=False): a reduced loss is harmless
    if axis_name not in (_varying_axes(value) or ()):
        raise ValueError(
            f"loss_fn returned a value already reduced over axis_name={axis_name!r}: give it "
            "this device's loss (no pmean/psum inside); the penalized function averages the "
            "gradient over the devices itself"
        )


def value_and_penalized_grad(
    loss_fn: Callable[..., Any],
    *,
    learning_rate: optax.ScalarOrSchedule | None,
    strength: optax.ScalarOrSchedule = 0.5,
    method: str = "forward",
    eps: float = 1e-2,
    has_aux: bool = False,
    axis_name: str | None = None,
) -> Callable[..., tuple[Any, PyTree]]:
    """Like ``jax.value_and_grad(loss_fn)``, with the gradient-norm penalty added to the gradient.

    The returned function computes, on one batch (the arguments after ``params``)::

        g  = grad L(params)                         (mean over ``axis_name`` if given)
        g' = g + strength * lr / 4 * H g            = grad [L + strength * lr / 8 * ||grad L||^2]

    (Geiping et al., ICLR 2022; see :func:`penalized_gradient`), with ``H g`` from
    :func:`hessian_vector_product` at the same batch and the same parameters. Because the
    penalty is computed here, from the loss itself, whatever follows (any optax chain,
    clipping, weight decay, ``optax.masked``, ``optax.MultiSteps``, a Flax ``TrainState``)
    receives an already-penalized gradient and cannot change what the penalty means.

    Call it as ``value, grads = f(params, *args, **kwargs)``; two keyword arguments are
    consumed by the wrapper and never reach ``loss_fn``:

    * ``step``: the optimizer step, needed when ``learning_rate`` or ``strength`` is a schedule;
    * ``learning_rate``: the rate at this call, when the wrapper was built with
      ``learning_rate=None`` (for a rate that changes at run time, e.g. reduce-on-plateau).

    Cost per call: ``"forward"`` two gradient evaluations (one more than plain training),
    ``"central"`` three, ``"jvp"`` about three to four (one forward-over-reverse pass).

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with
        ``has_aux``), differentiated with respect to its first argument.
      learning_rate: the optimizer's learning rate ``lr``: a float > 0, an Optax schedule of the
        step, or None to pass it at each call. With momentum ``mu`` the effective step is
        ``lr / (1 - mu)``; the paper (and gdreg's training program) still uses ``lr``.
      strength: the weight of the penalty, a float >= 0 or a schedule.
      method: ``"forward"`` (the paper's, default), ``"central"`` or ``"jvp"`` (exact).
      eps: L2 length > 0 of the finite-difference step.
      has_aux: as in ``jax.value_and_grad``; ``aux`` comes from the unperturbed evaluation.
      axis_name: inside ``shard_map`` or ``pmap`` over a batch split across devices, the mapped
        axis: the gradient is averaged over it before the perturbation (and the value too),
        which gives exactly the single-device result on the global batch. ``loss_fn`` must
        return the device's own loss, not a mean over devices. ``aux`` stays local.

    Returns:
      A function returning ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``);
      ``value`` is the loss ``L`` itself, without the penalty.

    Raises:
      ValueError: at construction for an unknown method, a negative strength, a learning rate
        <= 0, ``eps <= 0``, or a ``loss_fn`` with its own ``step`` or ``learning_rate``
        keyword; at call time for a missing ``step`` or ``learning_rate``, a learning rate
        given twice, or a loss already averaged over ``axis_name``.
      TypeError: for a hyperparameter that is not a number, an array or a schedule.
    """
    _check_method(method)
    _check_number("eps", eps, positive=True)
    _check_number("strength", strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=True)
    built_rate = learning_rate  # the call's own ``learning_rate`` keyword shadows the name
    _check_consumed_keywords(loss_fn)

    def gradient_and_aux(params, args, kwargs):
        if axis_name is not None:
            params = _varying(params, axis_name)
        # allow_int: integer leaves (step counters, indices) get float0 gradients and pass.
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux, allow_int=True)(
            params, *args, **kwargs
        )
        if axis_name is not None:
            _check_device_local(params, out[0] if has_aux else out, axis_name)
        return _mean_over(grads, axis_name), out

    def penalized(params, *args, step=None, learning_rate=None, **kwargs):
        if learning_rate is not None and built_rate is not None:
            raise ValueError(
                "learning_rate was given when the wrapper was built; pass it at the call only "
                "when building with learning_rate=None"
            )
        rate = built_rate if learning_rate is None else learning_rate
        if rate is None:
            raise ValueError(
                "learning_rate is required: build with learning_rate=<float or schedule>, or "
                "pass learning_rate=... at each call"
            )
        _check_number("learning_rate", learning_rate, positive=True)  # the built one: checked
        grads, out = gradient_and_aux(params, args, kwargs)
        new_grads = penalized_gradient(
            lambda p: gradient_and_aux(p, args, kwargs)[0],
            params,
            grads,
            strength=_at_step(strength, step, "strength"),
            learning_rate=_at_step(rate, step, "learning_rate"),
            method=method,
            eps=eps,
        )
        if has_aux:
            return (_mean_over(out[0], axis_name), out[1]), new_grads
        return _mean_over(out, axis_name), new_grads

    return penalized
