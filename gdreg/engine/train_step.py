"""What one optimizer step computes on the devices: gradient, update and metrics, fused.

Full batch (one step per epoch): the engine's microbatch calls accumulate the blocks' sums
(:meth:`gdreg.engine.fullbatch.FullBatchGradient.accumulate`); one jitted call then reduces them
across devices, applies the optax chain and computes the step's metrics, so the update costs
no dispatch of its own and nothing waits for the host between the last block and the update.

Stochastic (the SGD baseline): one jitted call per minibatch, which takes the minibatch's
images from the device-resident training set, splits them over the ``data`` axis (jit
shardings: XLA partitions every convolution by image and all-reduces BatchNorm's moments, the
loss's mean and the gradient), applies the update and adds the step's metrics to sums kept on
the devices. The epoch's permutation is sent to the devices once, the schedule is evaluated on
the devices, and the host reads the sums once per epoch. The step equals the one-device step
on the same minibatch up to float32 summation order, and each device does 1/N of its work.

Divergence guard, both modes: a step whose loss or gradient norm is not finite is not applied
(parameters, optimizer, penalty and BatchNorm state stay as they were) and, within an epoch,
no later step is applied either. The host learns it when it reads the epoch's metrics and
raises before anything reaches a checkpoint (:func:`gdreg.program.loop.run_epoch`).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg.engine.fullbatch import FullBatchGradient, FullBatchResult, hlo_flops
from gdreg.engine.mesh import DATA_AXIS, fetch_replicated
from gdreg.engine.signatures import PyTree
from gdreg.optim import sam
from gdreg.optim.line_search import ArmijoSettings, armijo_step

#: The per-step metrics a step returns (summed over the steps of an epoch in stochastic mode).
STEP_METRICS = (
    "loss",
    "accuracy",
    "block_grad_sq_norm",
    "grad_norm",
    "lr",
    "clipped",
    "param_sq_norm",
    "images",
)


#: The metrics that SAM reports from its evaluation at the parameters, not the ascent point.
REPORTED_AT_PARAMS = ("loss", "accuracy", "block_grad_sq_norm")

#: SGD steps a CPU split into several devices may have queued (:meth:`TrainStep.stochastic_epoch`).
#: Python dispatches an epoch's steps far faster than they run. With the queue unbounded, or
#: bounded at 32 steps, XLA:CPU (jax 0.10) deadlocked in a cross-device sum after some 150 to
#: 200 steps and aborted the process 40 s later (ResNet-18 or a small CNN, batch 128, 2
#: devices, epochs of 390 steps); bounds of 1 and 8 ran through, at the same speed. Other
#: backends queue without a bound.
CPU_STEPS_IN_FLIGHT = 2


def step_metrics(
    schedule: optax.Schedule,
    clip_norm: float,
    clip_norm_type: float,
    params: PyTree,
    grads: PyTree,
    metrics: dict[str, jax.Array],
    step: jax.Array,
) -> dict[str, jax.Array]:
    """The figures of one step (:data:`STEP_METRICS`) from the engine's ``metrics``:
    ``lr = schedule(step)``, ``clipped = clip_norm > 0 and ||g||_q > clip_norm`` (``q`` =
    ``clip_norm_type``, 2 or inf, the norm the clipping uses) and ``param_sq_norm =
    ||theta||^2`` before the update (the reference's ``param_norm``)."""
    dtype = metrics["loss"].dtype
    norm = metrics["grad_norm"]
    if clip_norm_type == float("inf"):
        norm = functools.reduce(
            jnp.maximum, (jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(grads))
        )
    figures = {key: metrics[key] for key in ("loss", "accuracy", "block_grad_sq_norm")}
    figures.update(
        grad_norm=metrics["grad_norm"],
        lr=jnp.asarray(schedule(step), dtype),
        clipped=jnp.asarray((clip_norm > 0) & (norm > clip_norm), dtype),
        param_sq_norm=jnp.asarray(optax.tree.norm(params, squared=True), dtype),
        images=jnp.asarray(metrics["images"], dtype),
    )
    return figures


def guarded_update(
    tx: optax.GradientTransformation,
    figures: Callable[..., dict[str, jax.Array]],
    state: tuple[PyTree, PyTree, PyTree, PyTree],
    result: tuple[PyTree, PyTree, PyTree, dict[str, jax.Array]],
    step: jax.Array,
    healthy: jax.Array,
) -> tuple[tuple[PyTree, PyTree, PyTree, PyTree], dict[str, jax.Array], jax.Array]:
    """One optimizer update, applied only while every step so far was finite.

    ``state``: (params, opt_state, model_state, penalty_state) before the step; ``result``:
    (grads, model_state, penalty_state, engine metrics) of the step's gradient; ``figures``:
    :func:`step_metrics` without its last four arguments. Returns the state after the step
    (the old one where the step is not applied), the step's metrics and ``healthy and the
    step's loss, ||g|| and the updated parameters are finite``.
    """
    params, opt_state, _, _ = state
    grads, model_state, penalty_state, metrics = result
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A finite gradient times a large learning rate can still overflow the parameters.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    healthy = functools.reduce(
        jnp.logical_and,
        (jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(new_params)),
        healthy & finite,
    )
    new_state = (new_params, new_opt_state, model_state, penalty_state)
    kept = jax.tree.map(lambda new, old: jnp.where(healthy, new, old), new_state, state)
    return kept, figures(params, grads, metrics, step), healthy


def _perturbed(params: PyTree, grads: PyTree, rho: float) -> PyTree:
    """SAM's ascent point ``params + rho * g / (||g|| + 1e-12)``."""
    return jax.tree.map(
        lambda p, e: p + e.astype(p.dtype), params, sam.sam_perturbation(grads, rho)
    )


def _with_metrics_at_params(
    result: FullBatchResult, at_params: FullBatchResult
) -> tuple[PyTree, PyTree, PyTree, dict[str, jax.Array]]:
    """SAM's step: the gradient and statistics of the ascent point, the penalty state and the
    loss, accuracy and block gradient norms of the evaluation at the parameters."""
    metrics = dict(result.metrics)
    metrics.update({key: at_params.metrics[key] for key in REPORTED_AT_PARAMS})
    return result.grads, result.model_state, at_params.penalty_state, metrics


def _moving_average(ema: PyTree, current: PyTree, momentum: jax.Array) -> PyTree:
    return jax.tree.map(
        lambda average, value: (
            momentum.astype(average.dtype) * average + (1 - momentum.astype(average.dtype)) * value
        ).astype(average.dtype),
        ema,
        current,
    )


def _epoch_carry(state: tuple[PyTree, PyTree, PyTree, PyTree]) -> tuple:
    """What the SGD steps of an epoch hand on: the state, zero metric sums, healthy, no bad
    step yet (-1)."""
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(state[0])), jnp.float32)
    sums = {key: jnp.zeros((), dtype) for key in STEP_METRICS}
    return state, sums, jnp.asarray(True), jnp.asarray(-1, jnp.int32)


class TrainStep:
    """The training step of a run: :meth:`fullbatch` or :meth:`stochastic_epoch`.

    Built once per run (it owns the compiled functions) from the run's engine, optax chain,
    schedule and mesh. ``sam_rho``: SAM's radius (:func:`gdreg.optim.sam.sam_gradient`:
    the gradient at the ascent point, applied at the parameters), in both modes;
    ``line_search``: the Armijo search along the optimizer's update, full-batch steps only;
    ``augment_every_step``: stochastic steps draw augmentations per step, not per epoch.
    """

    def __init__(
        self,
        engine: FullBatchGradient,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        *,
        clip_norm: float,
        clip_norm_type: float = 2.0,
        sam_rho: float | None = None,
        line_search: ArmijoSettings | None = None,
        augment_every_step: bool = False,
    ) -> None:
        self.engine = engine
        self.mesh = engine.mesh
        self.sam_rho = sam_rho
        self.line_search = line_search
        self._forward: FullBatchGradient | None = None  # the line search's loss (lazily)
        figures = functools.partial(step_metrics, schedule, clip_norm, clip_norm_type)
        update = functools.partial(guarded_update, tx, figures)

        def fused(state, carry, model_state, penalty_state, step, block_size, at_params):
            grads, model_state, metrics = engine.reduce(carry, model_state)
            metrics["images"] = metrics.pop("blocks") * block_size
            if at_params is not None:  # SAM: carry is the evaluation at the ascent point
                metrics.update(at_params)
            result = (grads, model_state, penalty_state, metrics)
            return update(state, result, step, jnp.asarray(True))

        self._fused = jax.jit(fused, donate_argnums=1)
        self._perturbed = jax.jit(functools.partial(_perturbed, rho=sam_rho or 0.0))
        self._figures = jax.jit(figures)
        self._tx_update = jax.jit(tx.update)

        split = NamedSharding(self.mesh, P(DATA_AXIS))
        batch_fn = engine.batch_fn

        def split_batch(data, indices, step):
            # Images (and everything computed from them) split over the devices by image.
            return jax.lax.with_sharding_constraint(batch_fn(data, indices, step), split)

        minibatch_engine = engine.replace(batch_fn=split_batch)

        def minibatch(carry, order, index, first_step, epoch, data):
            state, sums, healthy, first_bad = carry
            params, _, model_state, penalty_state = state
            indices = jax.lax.dynamic_index_in_dim(order, index, keepdims=False)
            step = first_step + index
            # Augmentation draws are a function of (image, epoch); with sampling with
            # replacement an image can come twice in an epoch and should look different.
            draw = step if augment_every_step else epoch
            result = minibatch_engine.single_block(
                params, model_state, penalty_state, data, indices, draw
            )
            if sam_rho is not None:
                ascent = minibatch_engine.single_block(
                    _perturbed(params, result.grads, sam_rho),
                    result.model_state,
                    penalty_state,
                    data,
                    indices,
                    draw,
                )
                result = _with_metrics_at_params(ascent, result)
            was_healthy = healthy
            state, metrics, healthy = update(state, result[:4], step, healthy)
            first_bad = jnp.where(was_healthy & ~healthy, step, first_bad)
            sums = {key: sums[key] + metrics[key] for key in STEP_METRICS}
            # The step's number, apart from the donated carry: a handle to wait for the step.
            return (state, sums, healthy, first_bad), step

        self._minibatch = jax.jit(minibatch, donate_argnums=0)
        self._moving_average = jax.jit(_moving_average, donate_argnums=0)
        self._order_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))

    def fullbatch(
        self,
        state: tuple[PyTree, PyTree, PyTree, PyTree],
        data: PyTree,
        block_indices: np.ndarray,
        step: int,
        epoch: int,
    ) -> tuple[tuple[PyTree, PyTree, PyTree, PyTree], dict[str, jax.Array], jax.Array]:
        """One full-batch step over ``block_indices`` (augmentation draws of ``epoch``).

        ``state``: (params, opt_state, model_state, penalty_state), replicated on the mesh.
        Returns the new state, the step's metrics and whether it was applied (device arrays;
        nothing is read back).
        """
        if self.line_search is not None:
            return self._line_search_step(state, data, block_indices, step, epoch)
        params, _, model_state, penalty_state = state
        at_params = None
        if self.sam_rho is not None:
            first = self.engine(params, model_state, penalty_state, data, block_indices, epoch)
            at_params = {key: first.metrics[key] for key in REPORTED_AT_PARAMS}
            params, model_state = self._perturbed(params, first.grads), first.model_state
        carry, new_penalty_state, model_state = self.engine.accumulate(
            params, model_state, penalty_state, data, block_indices, epoch
        )
        if self.sam_rho is not None:
            new_penalty_state = first.penalty_state  # one penalty update per step
        return self._fused(
            state,
            carry,
            model_state,
            new_penalty_state,
            jnp.asarray(step, jnp.int32),
            jnp.asarray(np.shape(block_indices)[1], jnp.int32),
            at_params,
        )

    def _line_search_step(self, state, data, block_indices, step, epoch):
        """:meth:`fullbatch` with the Armijo line search
        (:func:`gdreg.optim.line_search.armijo_step`) along the optimizer's update: backtracks from
        the update ``tx`` proposes (learning rate included) on the full-batch training loss
        (forward-only engine calls, train mode, the step's blocks and augmentation). The host reads
        each trial's loss.

        The objective is the mean cross-entropy alone: the slope ``<g, u>`` is taken with the
        gradient the optimizer received (with the penalty's term when ``penalty.strength >
        0``) and ``u`` includes weight decay, as in the reference, whose line search also
        compares plain losses. The value at the parameters comes from the same forward-only
        program as the trials, so that an update of zero (the first warmup epoch) is accepted
        at once instead of failing on rounding."""
        params, opt_state, model_state, penalty_state = state
        result = self.engine(params, model_state, penalty_state, data, block_indices, epoch)
        step = jnp.asarray(step, jnp.int32)
        metrics = self._figures(params, result.grads, result.metrics, step)
        loss = float(fetch_replicated(metrics["loss"]))
        if not (
            math.isfinite(loss) and math.isfinite(float(fetch_replicated(metrics["grad_norm"])))
        ):
            return state, metrics, jnp.asarray(False)
        updates, new_opt_state = self._tx_update(result.grads, opt_state, params)
        if self._forward is None:
            self._forward = self.engine.forward_only()

        def loss_fn(candidate):
            evaluation = self._forward(candidate, model_state, None, data, block_indices, epoch)
            return float(fetch_replicated(evaluation.metrics["loss"]))

        search = armijo_step(loss_fn, params, updates, result.grads, settings=self.line_search)
        metrics["line_search_step"] = jnp.asarray(search.step_size, metrics["loss"].dtype)
        new_state = (search.params, new_opt_state, result.model_state, result.penalty_state)
        return new_state, metrics, jnp.asarray(True)

    def stochastic_epoch(
        self,
        state: tuple[PyTree, PyTree, PyTree, PyTree],
        data: PyTree,
        minibatches: np.ndarray,
        first_step: int,
        epoch: int,
    ) -> tuple[tuple[PyTree, PyTree, PyTree, PyTree], dict[str, jax.Array], jax.Array, jax.Array]:
        """One SGD step per row of ``minibatches`` ([steps, batch_size] image indices).

        Returns the state after the last applied step, the sums of the steps' metrics over the
        epoch, whether every step was applied and the first step that was not (-1: none).
        """
        minibatches = np.asarray(minibatches, np.int32)
        batch_size = minibatches.shape[1]
        if batch_size % self.engine.num_devices:
            raise ValueError(
                f"batch_size {batch_size} does not split evenly over "
                f"{self.engine.num_devices} devices"
            )
        order = jax.make_array_from_callback(
            minibatches.shape, self._order_sharding, lambda index: minibatches[index]
        )
        # The steps donate their state to the next; the caller's arrays stay valid.
        carry = _epoch_carry(jax.tree.map(jnp.copy, state))
        first, epoch_scalar = jnp.asarray(first_step, jnp.int32), jnp.asarray(epoch, jnp.int32)
        bounded = self.engine.num_devices > 1 and self.mesh.devices.flat[0].platform == "cpu"
        queued: collections.deque[jax.Array] = collections.deque()
        for index in range(minibatches.shape[0]):
            carry, done = self._minibatch(carry, order, index, first, epoch_scalar, data)
            if bounded:
                queued.append(done)
                if len(queued) > CPU_STEPS_IN_FLIGHT:
                    queued.popleft().block_until_ready()
        return carry

    def moving_average(
        self, ema: PyTree, params: PyTree, model_state: PyTree, momentum: float
    ) -> PyTree:
        """``ema <- m * ema + (1 - m) * current`` for the weights and the BatchNorm statistics
        (the reference's ``_update_ema`` in ``fullbatch/training/utils.py``, once per epoch)."""
        current = {"params": params, "model_state": model_state}
        return self._moving_average(ema, current, jnp.asarray(momentum, jnp.float32))

    def minibatch_flops(
        self, state: tuple[PyTree, PyTree, PyTree, PyTree], data: PyTree, batch_size: int
    ) -> float | None:
        """XLA's FLOP count of one SGD step on ``batch_size`` images, per device (None where
        the backend reports none). With the minibatch split over N devices it is about 1/N
        of the one-device count."""
        order = jax.ShapeDtypeStruct((1, batch_size), jnp.int32, sharding=self._order_sharding)
        scalar = jnp.asarray(0, jnp.int32)
        flops = hlo_flops(self._minibatch, _epoch_carry(state), order, 0, scalar, scalar, data)
        # Counted before XLA partitions the step over the mesh: the whole minibatch's work.
        return flops / self.engine.num_devices if flops else None
