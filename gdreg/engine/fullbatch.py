"""The exact full-batch gradient, block by block, data-parallel over a device mesh.

Geiping et al., "Stochastic Training is Not Necessary for Generalization" (ICLR 2022), train
on the gradient of the loss over the whole training set. Their reference implementation
splits the set into blocks of ``block_size`` images; each block is its own forward pass (so
BatchNorm uses that block's statistics) and the unit of the gradient-norm regularizer:

    g = sum_B w_B * T(grad L_B(theta)) / sum_B w_B

with T the per-block transform (e.g. :func:`gdreg.gradient_norm_penalty`) and w_B = 1 for
every real block. This module computes that mean, plus the dataset's loss and accuracy, the
mean squared block-gradient norm (the regularizer's value) and the BatchNorm statistics.
With ``block_moments=True`` it also sums what the spread of the block gradients needs (see
:class:`FullBatchGradient`).

Layout. The caller passes the global block layout as an integer array
``block_indices[num_blocks, block_size]`` of (virtual) image indices. The blocks are padded
with zero-weight blocks to a multiple of ``devices * blocks_per_microbatch`` and split into
contiguous runs, one per device along the mesh axis ``data``. Which image lands in which
block therefore depends only on the caller's layout, never on the number of devices or
processes; only the float32 summation order changes with the device count.

Looping. Each device walks its blocks in microbatches of ``blocks_per_microbatch`` blocks.
``microbatch_loop="python"`` drives one jitted call per microbatch from Python and keeps
the running sums on the devices; ``"scan"`` puts the same body in a ``lax.scan`` inside one
jit. Inside a microbatch, ``block_loop="unroll"`` traces the blocks one after another,
``"vmap"`` batches them. On XLA:CPU convolutions inside loop bodies take a slow path (jax
issue 12868) and vmapped finite differences turn into grouped convolutions, so the Python
loop over single blocks is the CPU default; on GPUs fewer, larger calls win. Memory does not
grow with the number of images in either mode: only one microbatch is live at a time.

BatchNorm running statistics. ``loss_fn`` returns each forward pass's batch statistics (see
:class:`gdreg.models.layers.BatchNorm`); the engine turns those of all passes of a call into
the new running statistics by one of the rules of :mod:`gdreg.engine.running_statistics`:
``"reference"``, the reference implementation's sequential update over every train-mode pass (the
penalty's passes at perturbed weights included), each pass weighted by its global position so that
the result depends neither on the devices nor on the loop shape; ``"mean"``, one momentum step with
the mean block statistics; ``"recompute"``, left unchanged. Every leaf of ``model_state`` is
treated as such a running average.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg.engine import BATCHNORM_RULES, running_statistics
from gdreg.engine.mesh import DATA_AXIS, pad_with_zero_weights, shard_rows
from gdreg.engine.signatures import BatchFn, LossFn, PyTree

MICROBATCH_LOOPS = ("python", "scan")
BLOCK_LOOPS = ("unroll", "vmap")


class FullBatchResult(NamedTuple):
    """What one full-batch gradient evaluation returns (all replicated over the mesh).

    grads: mean over blocks of the (transformed) block gradients, float32 (float64 for float64
      parameters).
    model_state: the running BatchNorm statistics after the call, see module docstring.
    penalty_state: the per-block transform's state after one update (None for an engine
      built without a penalty).
    metrics: scalars ``loss`` and ``accuracy`` (means over the blocks' images),
      ``block_grad_sq_norm`` (mean over blocks of ||grad L_B||^2, before the transform),
      ``grad_norm`` (global L2 norm of ``grads``) and ``images`` (images that counted); with
      ``block_moments=True`` also ``block_grad_norm`` (mean over blocks of ||grad L_B||) and
      ``block_grad_sq_norm_min``/``_max`` (over the real blocks of ||grad L_B||^2).

    block_grad_sq: with ``block_moments=True``, the mean over blocks of the elementwise square
      of the block gradients, mean_B grad L_B * grad L_B (before the transform; shaped like
      ``grads``); else None.
    """

    grads: PyTree
    model_state: PyTree
    penalty_state: PyTree
    metrics: dict[str, jax.Array]
    block_grad_sq: PyTree = None


def block_layout(
    num_images: int, block_size: int, *, permutation_seed: int | None = None
) -> np.ndarray:
    """Assigns images to blocks: ``[num_images // block_size, block_size]`` image indices.

    Images beyond the last whole block are dropped (their number is ``num_images % block_size``);
    with ``permutation_seed`` the images are shuffled first (the paper's "shuffle", redrawn each
    step by passing a step-dependent seed), so different images are dropped each time.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = num_images // block_size
    if num_blocks == 0:
        raise ValueError(
            f"block_size {block_size} is larger than the number of training images {num_images}"
        )
    if permutation_seed is None:
        order = np.arange(num_images, dtype=np.int32)
    else:
        order = np.random.default_rng(permutation_seed).permutation(num_images).astype(np.int32)
    return order[: num_blocks * block_size].reshape(num_blocks, block_size)


def hlo_flops(function, *args) -> float | None:
    """XLA's FLOP count of the jitted ``function`` lowered for ``args``, or None where the
    backend reports none: one device's share for a ``shard_map`` body, the whole computation
    for a function that jit's shardings partition.

    Counted on the module before XLA optimizes and partitions it: on GPUs the compiled module's
    convolutions are calls into cuDNN, which the cost analysis counts as nothing (measured on
    an H200: 1% of ResNet-18's operations were left); before optimization they are
    convolutions, and on CPUs both counts agree."""
    try:
        cost = function.lower(*args).cost_analysis()
    except Exception:  # cost analysis is best effort and missing on some backends
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _accumulation_dtype(*trees: PyTree) -> jnp.dtype:
    """float32, or float64 where the inputs are float64 (sums never run in bfloat16)."""
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
    return jnp.promote_types(jnp.result_type(*leaves) if leaves else jnp.float32, jnp.float32)


def _tree_sq_norm(tree: PyTree) -> jax.Array:
    dtype = _accumulation_dtype(tree)
    return sum(
        (jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jax.tree.leaves(tree)),
        start=jnp.zeros((), dtype),
    )


def _accumulated(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, _accumulation_dtype(leaf)), tree)


#: Carry entries of ``block_moments`` that combine by minimum / maximum instead of by sums:
#: (pairwise combination, reduction along an axis).
_EXTREMES = {
    "block_grad_sq_norm_min": (jnp.minimum, jnp.min),
    "block_grad_sq_norm_max": (jnp.maximum, jnp.max),
}


def _merge(total: dict, sums: dict, add=jnp.add) -> dict:
    """``add`` leaf by leaf over the summed entries; the extremes by their min / max."""
    summed = [key for key in total if key not in _EXTREMES]
    merged = jax.tree.map(add, {k: total[k] for k in summed}, {k: sums[k] for k in summed})
    for key in total.keys() & _EXTREMES.keys():
        merged[key] = _EXTREMES[key][0](total[key], sums[key])
    return merged


def _reduce(tree: dict) -> dict:
    """Sums along axis 0 (a vmapped microbatch's blocks, or the devices); extremes by min/max."""
    summed = {k: v for k, v in tree.items() if k not in _EXTREMES}
    reduced = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), summed)
    for key in tree.keys() & _EXTREMES.keys():
        reduced[key] = _EXTREMES[key][1](tree[key], axis=0)
    return reduced


def _block_moments(grads: PyTree, sq_norm: jax.Array, weight: jax.Array) -> dict:
    """One block's share of the ``block_moments`` sums: w * g * g (elementwise), w * ||g||,
    and ||g||^2 for the minimum and maximum (+inf / -inf for a padding block, weight 0)."""
    real = weight > 0
    return {
        "block_grad_sq": jax.tree.map(lambda g: weight.astype(g.dtype) * jnp.square(g), grads),
        "block_grad_norm": weight.astype(sq_norm.dtype) * jnp.sqrt(sq_norm),
        "block_grad_sq_norm_min": jnp.where(real, sq_norm, jnp.inf),
        "block_grad_sq_norm_max": jnp.where(real, sq_norm, -jnp.inf),
    }


def _inside_forward_mode(tree: PyTree) -> bool:
    """Whether ``tree`` is being traced by forward-mode autodiff (the ``jvp`` penalty)."""
    return any(isinstance(leaf, jax.interpreters.ad.JVPTracer) for leaf in jax.tree.leaves(tree))


class FullBatchGradient:
    """Computes the full-batch gradient of ``loss_fn`` over a block layout on ``mesh``.

    Build once (it owns the compiled functions), call every step::

        engine = FullBatchGradient(loss_fn, batch_fn, mesh=data_mesh(), penalty=penalty)
        result = engine(params, model_state, penalty_state, data, block_indices, step)

    ``loss_fn`` and ``batch_fn`` are pure functions (see :mod:`gdreg.engine.signatures`); ``data``
    is a pytree held replicated on every device (e.g. the uint8 training set), which ``batch_fn``
    turns into one block's inputs: every pass over a block reads one input (behind an
    ``optimization_barrier``; on XLA:CPU, which drops barriers before fusing, ``batch_fn`` must
    give the same bits wherever it is recomputed, as gdreg's table lookup does). ``penalty`` is
    an optax transformation applied to every block gradient as ``penalty.update(g_B,
    penalty_state, params, penalty_grad_fn=grad of L_B, penalty_check=False)``: the engine
    switches :func:`gdreg.gradient_norm_penalty`'s checks off for every call (its blocks are
    correct by construction, and under the "reference" BatchNorm rule every evaluation of
    ``penalty_grad_fn`` outside forward-mode autodiff counts as a forward pass at perturbed
    weights, so a check's extra evaluation would be counted too, as is the forward-difference
    base that the penalty recomputes for bfloat16/float16 parameters).
    ``batchnorm_statistics`` names the rule for the running statistics
    (:data:`gdreg.engine.BATCHNORM_RULES`), ``batchnorm_momentum`` the weight of new statistics
    (PyTorch's convention, 0.1).

    With ``penalty_full_gradient=True`` each call makes two passes over the same blocks and
    augmentation draws, as the reference implementation does for its ``acc_strength``: the
    first computes the plain mean gradient ``g = mean_B grad L_B``, the second hands it to
    every block's penalty update as ``full_grads=g`` (see :func:`gdreg.gradient_norm_penalty`'s
    ``full_strength``).

    With ``block_moments=True`` (off in training) the engine also returns what the spread of
    the block gradients g_B = grad L_B (before the transform) needs: the mean over blocks of
    g_B * g_B elementwise (``FullBatchResult.block_grad_sq``), the mean of ||g_B|| and the
    minimum and maximum of ||g_B||^2 over the real blocks (in ``metrics``); see
    :func:`gdreg.program.analysis.analysis_metrics`. It costs one more parameter-sized sum per
    device.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        batch_fn: BatchFn,
        *,
        mesh: Mesh,
        penalty: optax.GradientTransformationExtraArgs | None = None,
        penalty_full_gradient: bool = False,
        blocks_per_microbatch: int = 1,
        microbatch_loop: str = "python",
        block_loop: str = "unroll",
        batchnorm_statistics: str = "reference",
        batchnorm_momentum: float = running_statistics.TORCH_MOMENTUM,
        block_moments: bool = False,
    ) -> None:
        if microbatch_loop not in MICROBATCH_LOOPS:
            raise ValueError(
                f"microbatch_loop must be one of {MICROBATCH_LOOPS}, got {microbatch_loop!r}"
            )
        if block_loop not in BLOCK_LOOPS:
            raise ValueError(f"block_loop must be one of {BLOCK_LOOPS}, got {block_loop!r}")
        if blocks_per_microbatch < 1:
            raise ValueError(
                f"blocks_per_microbatch must be at least 1, got {blocks_per_microbatch}"
            )
        if batchnorm_statistics not in BATCHNORM_RULES:
            raise ValueError(
                f"batchnorm_statistics must be one of {BATCHNORM_RULES}, got "
                f"{batchnorm_statistics!r}"
            )
        if not 0 < batchnorm_momentum <= 1:
            raise ValueError(f"batchnorm_momentum must be in (0, 1], got {batchnorm_momentum}")
        if penalty_full_gradient and penalty is None:
            raise ValueError("penalty_full_gradient needs a penalty to hand the gradient to")
        self.loss_fn = loss_fn
        self.batch_fn = batch_fn
        self.mesh = mesh
        self.penalty = penalty
        self.penalty_full_gradient = penalty_full_gradient
        self.blocks_per_microbatch = blocks_per_microbatch
        self.microbatch_loop = microbatch_loop
        self.block_loop = block_loop
        self.batchnorm_statistics = batchnorm_statistics
        self.batchnorm_momentum = batchnorm_momentum
        self.block_moments = block_moments
        self.num_devices = mesh.devices.size
        self._microbatch = jax.jit(self._sharded(self._microbatch_body), donate_argnums=0)
        self._all_microbatches = jax.jit(self._sharded(self._scan_body))
        self._finalize = jax.jit(self.reduce)
        # The device copy of the last layout's rows: a full-batch run without shuffling uses
        # the same layout every step, so it is sent to the devices once.
        self._resident_rows: tuple[np.ndarray, tuple[jax.Array, ...]] | None = None
        self._zero_carry = jax.jit(
            self._zero_carry_impl, out_shardings=NamedSharding(mesh, P(DATA_AXIS))
        )
        # The first pass of penalty_full_gradient: the same blocks without the penalty.
        self._plain = (
            self.replace(penalty=None, block_moments=False) if penalty_full_gradient else None
        )

    def replace(self, **changes) -> FullBatchGradient:
        """A new engine with the same settings except ``changes`` (constructor arguments)."""
        settings = {
            "loss_fn": self.loss_fn,
            "batch_fn": self.batch_fn,
            "mesh": self.mesh,
            "penalty": self.penalty,
            "penalty_full_gradient": self.penalty_full_gradient,
            "blocks_per_microbatch": self.blocks_per_microbatch,
            "microbatch_loop": self.microbatch_loop,
            "block_loop": self.block_loop,
            "batchnorm_statistics": self.batchnorm_statistics,
            "batchnorm_momentum": self.batchnorm_momentum,
            "block_moments": self.block_moments,
        }
        settings.update(changes)
        if settings["penalty"] is None:
            settings["penalty_full_gradient"] = False
        loss_fn, batch_fn = settings.pop("loss_fn"), settings.pop("batch_fn")
        return FullBatchGradient(loss_fn, batch_fn, **settings)

    def forward_only(self) -> FullBatchGradient:
        """An engine for the same blocks that computes the loss and accuracy only.

        Same loss, batch function, mesh and loop settings, no penalty, and the parameters behind
        ``stop_gradient``, so no backward pass runs: its ``grads`` come out as zeros and its
        ``metrics["loss"]``/``["accuracy"]`` equal this engine's.
        """
        loss_fn = self.loss_fn

        def frozen_loss(params, model_state, inputs, labels):
            return loss_fn(jax.lax.stop_gradient(params), model_state, inputs, labels)

        return self.replace(loss_fn=frozen_loss, penalty=None)

    # ----- layout -------------------------------------------------------------------------
    def padded_layout(self, block_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pads the layout with zero-weight blocks to a multiple of devices x microbatch."""
        block_indices = np.asarray(block_indices, dtype=np.int32)
        if block_indices.ndim != 2:
            raise ValueError(
                f"block_indices must be [num_blocks, block_size], got shape {block_indices.shape}"
            )
        return pad_with_zero_weights(block_indices, self.num_devices * self.blocks_per_microbatch)

    # ----- per block ----------------------------------------------------------------------
    def _block(self, shared, indices, weight, position):
        """Weighted sums over one block of ``indices`` (``weight`` 0 for padding) at its global
        ``position`` in the layout; ``shared``: (params, model_state, penalty_state,
        full_grads, data, step, number of real blocks), the same for every block."""
        params, model_state, penalty_state, full_grads, data, step, num_blocks = shared
        inputs, labels = self.batch_fn(data, indices, step)
        # One input per block: every pass of the block (the penalty's included) and every
        # gradient must read the same values. XLA fuses a cheap elementwise producer into
        # each of its consumers, so the copy the stem convolution's kernel gradient reads is
        # recomputed apart from the forward pass's; had it arithmetic (FMA contraction), the
        # two would differ in the last bits and the gradient would be the gradient at no
        # single input. GPU and TPU compilers keep the barrier through fusion and materialize
        # the block once; XLA:CPU drops it before fusion (seen in its HLO passes), so there
        # it is the batch function that must compute the same bits wherever XLA recomputes
        # it: gdreg's do (a table lookup and uint8 moves, gdreg.data.normalize).
        inputs = jax.lax.optimization_barrier(inputs)

        def loss_and_statistics(p):
            loss, (statistics, _) = self.loss_fn(p, model_state, inputs, labels)
            return loss, statistics

        (loss, (statistics, aux)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
            params, model_state, inputs, labels
        )
        grads = _accumulated(grads)
        sq_norm = _tree_sq_norm(grads)
        block_grads = grads  # before the transform, for block_moments
        new_penalty_state = penalty_state
        # The statistics of the penalty's passes at perturbed weights, in the order they run.
        # The jvp penalty's pass (traced by forward-mode autodiff) is the gradient pass itself,
        # as the reference's double backprop makes no extra forward pass.
        perturbed = []
        if self.penalty is not None:

            def penalty_grad_fn(p):
                gradient, pass_statistics = jax.grad(loss_and_statistics, has_aux=True)(p)
                if not _inside_forward_mode(p):
                    perturbed.append(pass_statistics)
                return gradient

            extra = {"full_grads": full_grads} if self.penalty_full_gradient else {}
            grads, new_penalty_state = self.penalty.update(
                grads,
                penalty_state,
                params,
                penalty_grad_fn=penalty_grad_fn,
                penalty_check=False,  # per block, each step: see the class docstring
                **extra,
            )
            grads = _accumulated(grads)
        passes = [statistics, *perturbed]
        dtype = sq_norm.dtype
        sums = {
            "grads": grads,
            "statistics": self._statistics_share(passes, position, num_blocks),
            "loss": jnp.asarray(loss, dtype),
            "accuracy": jnp.asarray(aux["accuracy"], dtype),
            "block_grad_sq_norm": sq_norm,
            "passes": jnp.asarray(len(passes), dtype),
        }
        sums = jax.tree.map(lambda leaf: weight.astype(leaf.dtype) * leaf, sums)
        sums["weight"] = weight
        if self.block_moments:
            sums.update(_block_moments(block_grads, sq_norm, weight))
        return sums, new_penalty_state

    def _statistics_share(self, passes, position, num_blocks):
        """One block's share of the running statistics' update (see
        :mod:`gdreg.engine.running_statistics`): its gradient pass's statistics ("mean"), or the
        weighted sum over its passes in their global order ("reference"; pass j of block b is pass b
        * P + j of K = B * P)."""
        passes = [_accumulated(statistics) for statistics in passes]
        if self.batchnorm_statistics == "mean":
            return passes[0]
        if self.batchnorm_statistics == "recompute":
            return jax.tree.map(jnp.zeros_like, passes[0])
        dtype = _accumulation_dtype(passes)
        per_block = len(passes)
        first = jnp.asarray(position, dtype) * per_block
        total = jnp.asarray(num_blocks, dtype) * per_block
        share = None
        for j, statistics in enumerate(passes):
            weight = running_statistics.sequential_weight(first + j, total, self.batchnorm_momentum)
            term = jax.tree.map(lambda leaf, w=weight: w.astype(leaf.dtype) * leaf, statistics)
            share = term if share is None else jax.tree.map(jnp.add, share, term)
        return share

    def _microbatch_sums(self, shared, indices, weights, positions):
        """Weighted sums over the blocks of one microbatch (indices: [blocks, block_size])."""
        if self.block_loop == "vmap":
            sums, new_penalty_state = jax.vmap(self._block, in_axes=(None, 0, 0, 0))(
                shared, indices, weights, positions
            )
            sums = _reduce(sums)
            new_penalty_state = jax.tree.map(lambda leaf: leaf[0], new_penalty_state)
            return sums, new_penalty_state
        total = None
        for j in range(indices.shape[0]):
            sums, new_penalty_state = self._block(shared, indices[j], weights[j], positions[j])
            total = sums if total is None else _merge(total, sums)
        return total, new_penalty_state

    # ----- per device (inside shard_map) ----------------------------------------------------
    def _microbatch_body(self, carry, shared, indices, weights, positions, index):
        start = index * self.blocks_per_microbatch
        take = functools.partial(
            jax.lax.dynamic_slice_in_dim,
            start_index=start,
            slice_size=self.blocks_per_microbatch,
            axis=0,
        )
        sums, new_penalty_state = self._microbatch_sums(
            shared, take(indices), take(weights), take(positions)
        )
        carry = _merge(carry, sums, lambda acc, s: acc + s[None])
        return carry, new_penalty_state

    def _scan_body(self, carry, shared, indices, weights, positions, _):
        num_microbatches = indices.shape[0] // self.blocks_per_microbatch
        penalty_state = shared[2]

        def body(state, index):
            acc, _ = state
            return self._microbatch_body(acc, shared, indices, weights, positions, index), None

        (carry, new_penalty_state), _ = jax.lax.scan(
            body, (carry, penalty_state), jnp.arange(num_microbatches)
        )
        return carry, new_penalty_state

    def _sharded(self, body):
        shard = P(DATA_AXIS)
        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(shard, P(), shard, shard, shard, P()),
            out_specs=(shard, P()),
            # With varying-axis checks on, the gradient of a device-local loss with respect to
            # replicated parameters is psum-ed over devices by autodiff; every block gradient
            # here must stay local (the reduction happens once, in _finalize).
            check_vma=False,
        )

    # ----- reduction across devices ---------------------------------------------------------
    def reduce(self, carry: PyTree, model_state: PyTree) -> tuple[PyTree, PyTree, dict]:
        """``(grads, model_state, metrics)`` from the per-device sums of :meth:`accumulate`.

        Pure and jittable, so a training step can fuse it with the optimizer update
        (:mod:`gdreg.engine.train_step`). ``metrics`` holds ``blocks`` (the real blocks) in place of
        ``images``.
        """
        # carry leaves are [devices, ...] sharded over `data`: summing axis 0 is the all-reduce.
        totals = _reduce(carry)
        extremes = {key: totals.pop(key) for key in _EXTREMES if key in totals}
        count = totals.pop("weight")
        passes = totals.pop("passes")
        statistics = totals.pop("statistics")
        means = jax.tree.map(lambda leaf: leaf / count.astype(leaf.dtype), totals)
        grads = means.pop("grads")
        metrics = dict(means, **extremes)
        metrics["grad_norm"] = jnp.sqrt(_tree_sq_norm(grads))
        metrics["blocks"] = count
        momentum = self.batchnorm_momentum
        if self.batchnorm_statistics == "reference":
            model_state = running_statistics.combine(
                model_state, statistics, running_statistics.decay(passes, momentum)
            )
        elif self.batchnorm_statistics == "mean":
            mean_share = jax.tree.map(
                lambda leaf: momentum * leaf / count.astype(leaf.dtype), statistics
            )
            model_state = running_statistics.combine(
                model_state, mean_share, jnp.asarray(1 - momentum, passes.dtype)
            )
        return grads, model_state, metrics

    def _zero_carry_impl(self, params, model_state):
        dtype = _accumulation_dtype(params)

        def zeros(leaf):
            leaf_dtype = jnp.promote_types(jnp.result_type(leaf), jnp.float32)
            return jnp.zeros((self.num_devices, *jnp.shape(leaf)), leaf_dtype)

        scalar = jnp.zeros((), dtype)
        template = {
            "grads": params,
            "statistics": model_state,
            "loss": scalar,
            "accuracy": scalar,
            "block_grad_sq_norm": scalar,
            "passes": scalar,
            "weight": jnp.zeros((), jnp.float32),
        }
        if not self.block_moments:
            return jax.tree.map(zeros, template)
        template.update(block_grad_sq=params, block_grad_norm=scalar)
        carry = jax.tree.map(zeros, template)
        carry["block_grad_sq_norm_min"] = jnp.full((self.num_devices,), jnp.inf, dtype)
        carry["block_grad_sq_norm_max"] = jnp.full((self.num_devices,), -jnp.inf, dtype)
        return carry

    def _device_rows(self, block_indices: np.ndarray) -> tuple[jax.Array, ...]:
        """The padded layout's indices, weights and positions, split over the devices (kept on
        the devices while the caller passes the same layout)."""
        block_indices = np.asarray(block_indices, dtype=np.int32)
        resident = self._resident_rows
        if resident is not None and np.array_equal(resident[0], block_indices):
            return resident[1]
        indices, weights = self.padded_layout(block_indices)
        positions = np.arange(indices.shape[0], dtype=np.int32)
        rows = tuple(shard_rows(row, self.mesh) for row in (indices, weights, positions))
        self._resident_rows = (block_indices.copy(), rows)
        return rows

    def _arguments(self, params, model_state, penalty_state, full_grads, data, block_indices, step):
        """The zero carry, the arguments of a microbatch call, and the microbatches per device."""
        rows = self._device_rows(block_indices)
        num_microbatches = rows[0].shape[0] // (self.num_devices * self.blocks_per_microbatch)
        shared = (
            params,
            model_state,
            penalty_state,
            full_grads,
            data,
            jnp.asarray(step, jnp.int32),
            jnp.asarray(block_indices.shape[0], jnp.int32),
        )
        return self._zero_carry(params, model_state), (shared, *rows), num_microbatches

    def _full_gradient(self, params, model_state, data, block_indices, step):
        """The first pass of ``penalty_full_gradient``: the plain mean gradient (else None), and
        the running statistics the next pass starts from (the first pass's forward passes
        come first under the "reference" rule, as in the reference; the other rules ignore
        them)."""
        if self._plain is None:
            return None, model_state
        plain = self._plain(params, model_state, None, data, block_indices, step)
        if self.batchnorm_statistics == "reference":
            model_state = plain.model_state
        return plain.grads, model_state

    def step_flops(
        self,
        params: PyTree,
        model_state: PyTree,
        penalty_state: PyTree,
        data: PyTree,
        block_indices: np.ndarray,
    ) -> float | None:
        """XLA's FLOP count of one full evaluation over ``block_indices``, all devices together.

        The cost analysis of one compiled microbatch call (one device's share) times the number
        of calls times the devices, plus the first pass with ``penalty_full_gradient``; None
        where the backend reports no FLOP count.
        """
        first_pass = 0.0
        if self._plain is not None:
            first_pass = self._plain.step_flops(params, model_state, None, data, block_indices)
            if first_pass is None:
                return None
        full_grads = jax.tree.map(jnp.zeros_like, params) if self._plain is not None else None
        carry, args, num_microbatches = self._arguments(
            params, model_state, penalty_state, full_grads, data, block_indices, 0
        )
        flops = hlo_flops(self._microbatch, carry, *args, jnp.int32(0))
        if flops is None:
            return None
        return first_pass + flops * num_microbatches * self.num_devices

    def accumulate(
        self,
        params: PyTree,
        model_state: PyTree,
        penalty_state: PyTree,
        data: PyTree,
        block_indices: np.ndarray,
        step: int | jax.Array,
    ) -> tuple[PyTree, PyTree, PyTree]:
        """Runs every block; returns ``(carry, penalty_state, model_state)`` for :meth:`reduce`.

        ``carry``: the per-device weighted sums; ``penalty_state``: the transform's state after
        its update; ``model_state``: the running statistics the reduction starts from (those
        after the first pass of ``penalty_full_gradient`` under the "reference" rule, else the
        given ones). Arguments as for :meth:`__call__`.
        """
        full_grads, model_state = self._full_gradient(
            params, model_state, data, block_indices, step
        )
        carry, args, num_microbatches = self._arguments(
            params, model_state, penalty_state, full_grads, data, block_indices, step
        )
        new_penalty_state = penalty_state
        if self.microbatch_loop == "scan":
            carry, new_penalty_state = self._all_microbatches(carry, *args, jnp.int32(0))
        else:
            for index in range(num_microbatches):
                carry, new_penalty_state = self._microbatch(carry, *args, jnp.int32(index))
        return carry, new_penalty_state, model_state

    def single_block(
        self,
        params: PyTree,
        model_state: PyTree,
        penalty_state: PyTree,
        data: PyTree,
        indices: jax.Array,
        step: int | jax.Array,
    ) -> FullBatchResult:
        """The result of :meth:`__call__` for the one block ``indices`` ([block_size]), as a
        pure function to trace under ``jax.jit`` (no ``shard_map``, no Python loop).

        For steps on one block at a time (the SGD baseline, :mod:`gdreg.engine.train_step`): with
        the block's images sharded over the devices by jit shardings, XLA splits the work by image
        and all-reduces what the block's forward pass reduces over its images (BatchNorm's
        moments, the loss's mean), so the result is the one-device result on the same block.
        """
        full_grads = None
        if self._plain is not None:
            plain = self._plain.single_block(params, model_state, None, data, indices, step)
            full_grads = plain.grads
            if self.batchnorm_statistics == "reference":
                model_state = plain.model_state
        shared = (params, model_state, penalty_state, full_grads, data, step, jnp.int32(1))
        sums, new_penalty_state = self._block(shared, indices, jnp.float32(1), jnp.int32(0))
        carry = jax.tree.map(lambda leaf: leaf[None], sums)
        grads, model_state, metrics = self.reduce(carry, model_state)
        metrics["images"] = metrics.pop("blocks") * indices.shape[0]
        return FullBatchResult(grads, model_state, new_penalty_state, metrics)

    def __call__(
        self,
        params: PyTree,
        model_state: PyTree,
        penalty_state: PyTree,
        data: PyTree,
        block_indices: np.ndarray,
        step: int | jax.Array,
    ) -> FullBatchResult:
        """Mean transformed block gradient over ``block_indices`` ([num_blocks, block_size]).

        ``params``, ``model_state``, ``penalty_state`` and ``data`` should already be replicated
        on the mesh (see :func:`gdreg.engine.mesh.replicate`); ``block_indices`` is a host array,
        identical on every process. ``step`` is handed to ``batch_fn`` (augmentation draws).
        """
        carry, new_penalty_state, model_state = self.accumulate(
            params, model_state, penalty_state, data, block_indices, step
        )
        grads, model_state, metrics = self._finalize(carry, model_state)
        metrics["images"] = metrics.pop("blocks") * block_indices.shape[1]
        block_grad_sq = metrics.pop("block_grad_sq", None)
        return FullBatchResult(grads, model_state, new_penalty_state, metrics, block_grad_sq)
