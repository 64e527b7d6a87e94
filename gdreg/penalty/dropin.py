"""A drop-in for ``jax.value_and_grad`` that returns the gradient with the penalty added.

Geiping et al. (ICLR 2022, arXiv 2109.14119): the gradient of
``L + strength * lr / 8 * ||grad L||^2`` on one batch, computed from that batch alone
(:func:`gdreg.penalty.hessian.penalized_gradient`), so whatever optimizer, clipping, masking or
accumulation follows receives a correct gradient. :func:`with_penalized_gradient` gives the
same gradient to code that differentiates a loss itself (Flax's ``DynamicScale``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdreg.penalty.hessian import (
    PyTree,
    _at_step,
    _check_method,
    _check_number,
    _either,
    _fail_if,
    _is_float,
    _is_traced,
    _mean_over,
    _penalized_gradient,
    _rate_error,
    _varying,
    _varying_axes,
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


def _mapped_axes() -> tuple[Any, ...]:
    """The named axes the caller is mapped over (``pmap``, ``shard_map``, a named ``vmap``)."""
    try:
        # No public API lists them (jax 0.7 to 0.10); without it the check is skipped.
        from jax._src import core

        return tuple(core.get_axis_env().axis_sizes)
    except Exception:  # any other JAX: no names, no check
        return ()


def _forgotten_axis_message(name: Any, known: bool) -> str:
    where = (
        f"the loss varies over the mesh axis {name!r} (each device has its own slice of the "
        "batch) while the parameters do not"
        if known
        else f"it runs inside the mapped axis {name!r} (jax.pmap, shard_map or a named vmap)"
    )
    return (
        f"value_and_penalized_grad was given no axis_name, but {where}: each device would "
        "take the penalty of its own slice, and no pmean afterwards turns that into the "
        f"penalty of the whole batch. Pass axis_name={name!r}: the gradient is then averaged "
        "over the devices before the penalty, exactly the single-device step on the whole "
        "batch (a pmean of the result afterwards is harmless). If each device is meant to "
        "have its own penalty, pass check=False."
    )


def _check_axes(params: PyTree, value: Any | None) -> None:
    """Refuses a data-parallel call without ``axis_name`` (see ``_forgotten_axis_message``).

    Under ``shard_map`` with its varying-axes checks JAX tracks what varies over each axis,
    so a loss averaged inside ``loss_fn`` (which does not vary) passes; under ``pmap`` nothing
    is tracked, and a call inside the mapped axis is refused (``value=None``: before the loss).
    """
    floating = [leaf for leaf in jax.tree.leaves(params) if _is_float(leaf)]
    for name in _mapped_axes():
        tracked = name in (_varying_axes(jax.lax.axis_index(name)) or ())
        if not tracked and value is None:
            raise ValueError(_forgotten_axis_message(name, known=False))
        if tracked and value is not None:
            loss_varies = name in (_varying_axes(value) or ())
            params_vary = bool(floating) and name in (_varying_axes(floating[0]) or ())
            if loss_varies and not params_vary:
                raise ValueError(_forgotten_axis_message(name, known=True))


def _hyperparameter_checks(rate: Any, strength: Any) -> Any:
    """Run-time checks of traced hyperparameters (a schedule at a traced step): a flag."""
    failed: Any = False
    for name, value in (("learning_rate", rate), ("strength", strength)):
        if _is_traced(value):
            bad = ~(jnp.isfinite(value) & (value >= 0))
            failed = _either(failed, _fail_if(bad, _rate_error(name), value))
    return failed


def _penalized_call(
    loss_fn: Callable[..., Any],
    *,
    method: str,
    eps: float,
    has_aux: bool,
    axis_name: str | None,
    check: bool,
) -> Callable[..., tuple[Any, PyTree]]:
    """``core(params, args, kwargs, rate=, strength=, scale=None) -> (out, g')``.

    ``g' = g + strength * rate / 4 * H g`` for the loss ``loss_fn(params, *args, **kwargs)``
    (its gradient averaged over ``axis_name``); ``out`` is what ``loss_fn`` returned (the
    value averaged over ``axis_name``). With ``scale`` (a loss scale, see
    :func:`with_penalized_gradient`) everything is computed for ``scale * L``, so ``g'`` and
    ``out``'s value come back multiplied by it.
    """

    def gradient_and_aux(params, args, kwargs, scale, first):
        if axis_name is not None:
            params = _varying(params, axis_name)

        def loss(p, *a, **k):
            out = loss_fn(p, *a, **k)
            if scale is None:
                return out
            return (scale * out[0], out[1]) if has_aux else scale * out

        # allow_int: integer leaves (step counters, indices) get float0 gradients and pass.
        out, grads = jax.value_and_grad(loss, has_aux=has_aux, allow_int=True)(
            params, *args, **kwargs
        )
        if first:  # the perturbed evaluations are the same program
            value = out[0] if has_aux else out
            if axis_name is not None:
                _check_device_local(params, value, axis_name)
            elif check:
                _check_axes(params, value)
        return _mean_over(grads, axis_name), out

    def core(params, args, kwargs, *, rate, strength, scale=None):
        if check and axis_name is None:
            _check_axes(params, None)
        _check_number("learning_rate", rate, positive=False)
        grads, out = gradient_and_aux(params, args, kwargs, scale, True)
        failed = _hyperparameter_checks(rate, strength) if check else False
        if scale is not None:
            # v = strength * g, unscaled: H (scale L) v = scale * H v, so g' = scale * (g + ...).
            nonzero = scale != 0
            strength = jnp.where(nonzero, strength / jnp.where(nonzero, scale, 1), 0)
        new_grads, _, _ = _penalized_gradient(
            lambda p: gradient_and_aux(p, args, kwargs, scale, False)[0],
            params,
            grads,
            strength=strength,
            learning_rate=rate,
            method=method,
            eps=eps,
            guard=None if failed is False else (lambda base: failed),
        )
        if has_aux:
            return (_mean_over(out[0], axis_name), out[1]), new_grads
        return _mean_over(out, axis_name), new_grads

    return core


def _check_settings(method: str, eps: float, strength: Any, learning_rate: Any) -> None:
    _check_method(method)
    _check_number("eps", eps, positive=True)
    _check_number("strength", strength, positive=False)
    _check_number("learning_rate", learning_rate, positive=False)


def value_and_penalized_grad(
    loss_fn: Callable[..., Any],
    *,
    learning_rate: optax.ScalarOrSchedule | None,
    strength: optax.ScalarOrSchedule = 0.5,
    method: str = "jvp",
    eps: float = 1e-2,
    has_aux: bool = False,
    axis_name: str | None = None,
    check: bool = True,
) -> Callable[..., tuple[Any, PyTree]]:
    """Like ``jax.value_and_grad(loss_fn)``, with the gradient-norm penalty added to the gradient.

    The returned function computes, on one batch (the arguments after ``params``)::

        g  = grad L(params)                         (mean over ``axis_name`` if given)
        g' = g + strength * lr / 4 * H g            = grad [L + strength * lr / 8 * ||grad L||^2]

    (Geiping et al., ICLR 2022, arXiv 2109.14119; see
    :func:`gdreg.penalty.hessian.penalized_gradient`), with ``H g`` at the same batch and the
    same parameters, by default exactly (forward-over-reverse autodiff). Because the penalty is
    computed here, from the loss itself, whatever follows (any optax chain, clipping, weight
    decay, ``optax.masked``, ``optax.MultiSteps``, a Flax ``TrainState``) receives an
    already-penalized gradient and cannot change what the penalty means.

    Call it as ``value, grads = f(params, *args, **kwargs)``; two keyword arguments are
    consumed by the wrapper and never reach ``loss_fn``:

    * ``step``: the optimizer step, needed when ``learning_rate`` or ``strength`` is a schedule;
    * ``learning_rate``: the rate at this call, when the wrapper was built with
      ``learning_rate=None`` (a rate that changes at run time: ``optax.inject_hyperparams``'s
      ``opt_state.hyperparams["learning_rate"]``, times ``reduce_on_plateau``'s ``scale``).

    Cost per call: ``"jvp"`` about three to four gradient evaluations' worth (one
    forward-over-reverse pass), ``"forward"`` two gradient evaluations (one more than plain
    training), ``"central"`` three.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with
        ``has_aux``), differentiated with respect to its first argument.
      learning_rate: the optimizer's learning rate ``lr``: a float >= 0 (0: no penalty), an
        Optax schedule of the step (a warmup from 0 is fine), or None to pass it at each call.
        It is the optimizer's own rate whatever the optimizer (momentum, Adam): the paper
        passes it unchanged and sets the size with ``strength``.
      strength: the weight of the penalty, a float >= 0 or a schedule.
      method: ``"jvp"`` (exact, the default), ``"forward"`` (the paper's forward differences,
        two gradient evaluations; on ReLU networks a different regularizer, see
        :mod:`gdreg.penalty.hessian`) or ``"central"``.
      eps: L2 length > 0 of the finite-difference step (unused by ``"jvp"``).
      has_aux: as in ``jax.value_and_grad``; ``aux`` comes from the unperturbed evaluation.
      axis_name: inside ``shard_map`` or ``pmap`` over a batch split across devices, the mapped
        axis: the gradient is averaged over it before the perturbation (and the value too),
        which gives exactly the single-device result on the global batch. ``loss_fn`` must
        return the device's own loss, not a mean over devices (BatchNorm's own ``axis_name``
        is fine, and so is a ``pmean`` of the result afterwards). ``aux`` stays local.
      check: the default checks: a call inside a mapped axis without ``axis_name`` is refused
        (at trace time), and traced rates and strengths (a schedule at a traced step) must be
        finite and >= 0 (at run time, one scalar test per call). False turns both off.

    Returns:
      A function returning ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``);
      ``value`` is the loss ``L`` itself, without the penalty.

    Raises:
      ValueError: at construction for an unknown method, a negative strength or learning
        rate, ``eps <= 0``, or a ``loss_fn`` with its own ``step`` or ``learning_rate``
        keyword; at call time for a missing ``step`` or ``learning_rate``, a learning rate
        given twice, a loss already averaged over ``axis_name``, a forgotten ``axis_name``,
        ``"jvp"`` through a ``jax.custom_vjp`` function, or a negative or non-finite traced
        rate or strength (under ``jit`` as a ``JaxRuntimeError`` ending in gdreg's message).
      TypeError: for a hyperparameter that is not a number, an array or a schedule.
    """
    _check_settings(method, eps, strength, learning_rate)
    built_rate = learning_rate  # the call's own ``learning_rate`` keyword shadows the name
    _check_consumed_keywords(loss_fn)
    core = _penalized_call(
        loss_fn, method=method, eps=eps, has_aux=has_aux, axis_name=axis_name, check=check
    )

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
        return core(
            params,
            args,
            kwargs,
            rate=_at_step(rate, step, "learning_rate"),
            strength=_at_step(strength, step, "strength"),
        )

    return penalized


def with_penalized_gradient(
    loss_fn: Callable[..., Any],
    *,
    learning_rate: optax.ScalarOrSchedule,
    strength: optax.ScalarOrSchedule = 0.5,
    method: str = "jvp",
    eps: float = 1e-2,
    has_aux: bool = False,
    axis_name: str | None = None,
    check: bool = True,
) -> Callable[..., Any]:
    """``loss_fn`` itself, except that its gradient is the penalized one.

    For code that differentiates a loss on its own and cannot take
    :func:`value_and_penalized_grad` in its place, such as Flax's
    ``DynamicScale.value_and_grad`` (float16 loss scaling)::

        grad_fn = dynamic_scale.value_and_grad(
            gdreg.with_penalized_gradient(loss_fn, learning_rate=lr, axis_name="batch"), ...
        )

    The returned ``f(params, *args, step=None, **kwargs)`` returns what ``loss_fn`` returns;
    reverse-mode differentiation with respect to ``params`` (``jax.grad``, ``jax.vjp``) gives
    ``c * (g + strength * lr / 4 * H g)`` for an output cotangent ``c`` (Geiping et al., ICLR
    2022, arXiv 2109.14119), computed for the loss ``c * L`` so that a loss scale ``c``
    protects float16 gradients as it does without the penalty. The penalty's direction is
    ``g`` itself, unscaled. ``args`` get zero cotangents: differentiate with respect to
    ``params`` only. Forward mode (``jax.jvp``) is not defined (``jax.custom_vjp``).

    Cost: the plain forward pass, then in the backward pass what
    :func:`value_and_penalized_grad` costs (one forward pass more than it). The arguments are
    those of :func:`value_and_penalized_grad`; ``step`` is needed by schedules (a rate
    computed from the step beforehand, as Flax's ImageNet example does, needs none).
    """
    _check_settings(method, eps, strength, learning_rate)
    if learning_rate is None:
        raise ValueError("learning_rate is required: a float >= 0, an array or a schedule")
    _check_consumed_keywords(loss_fn)
    core = _penalized_call(
        loss_fn, method=method, eps=eps, has_aux=has_aux, axis_name=axis_name, check=check
    )

    def wrapped(params, *args, step=None, **kwargs):
        rate = _at_step(learning_rate, step, "learning_rate")
        strength_t = _at_step(strength, step, "strength")

        # Hyperparameters and the other arguments go in as primal inputs (with zero
        # cotangents), so that neither fwd nor bwd closes over traced values.
        @jax.custom_vjp
        def penalized(p, a, hyper):
            return loss_fn(p, *a, **kwargs)

        def forward(p, a, hyper):
            return loss_fn(p, *a, **kwargs), (p, a, hyper)

        def backward(residuals, cotangent):
            p, a, hyper = residuals
            scale = cotangent[0] if has_aux else cotangent
            _, grads = core(p, a, kwargs, rate=hyper[0], strength=hyper[1], scale=scale)
            return grads, jax.tree.map(_zero_cotangent, a), jax.tree.map(_zero_cotangent, hyper)

        penalized.defvjp(forward, backward)
        return penalized(params, args, (rate, strength_t))

    return wrapped


def _zero_cotangent(leaf: Any) -> Any:
    if _is_float(leaf) or jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
        return jnp.zeros_like(leaf)
    return np.zeros(jnp.shape(leaf), jax.dtypes.float0)
