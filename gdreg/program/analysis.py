"""Analysis metrics of a training state: norms, the spread of the block gradients, flatness.

:func:`analysis_metrics` measures, at a :class:`gdreg.program.experiment.TrainState`, what the
reference implementation's optional ``analyze`` step (``fullbatch/analysis/analysis.py``,
switched on by its ``config/analysis/*.yaml``) logs, computed block by block and sharded over
the devices by the same :class:`gdreg.engine.fullbatch.FullBatchGradient` as training (with
``block_moments=True``), so it scales like a training step. ``analysis.every_epochs`` says how
often the training loop calls it; every metric is named ``analysis_*``.

The blocks are those of the epoch that follows the state (its layout and augmentation draws,
:func:`gdreg.program.experiment.epoch_blocks`; in stochastic mode the epoch's minibatches are the
blocks), so the gradient measured is the plain (unpenalized) gradient of the next step. With
K blocks of B images each, N = K * B the images they hold, and g_B = grad L_B(theta) the
gradient of block B's mean cross-entropy in training mode (BatchNorm on the block's own
statistics, as training computes it; the reference's ``analyze`` runs its model in eval
mode), G = mean_B g_B:

- ``analysis_param_norm`` = ||theta||; ``analysis_momentum_norm`` = ||m|| with m the
  optimizer's momentum (``trace`` of optax's SGD, ``mu`` of Adam; absent without momentum);
- ``analysis_grad_norm`` = ||G||;
- ``analysis_block_grad_norm_min`` / ``_mean`` / ``_max``: min, mean and max over blocks of
  ||g_B|| (the reference records every block's norm, ``record_gradient_norm_per_batch``);
- the reference's signal-to-noise figures (``compute_gradient_SNR``), from the elementwise
  sample standard deviation over blocks, sigma_j^2 = K / (K - 1) * (mean_B g_Bj^2 - G_j^2),
  of every parameter entry j (P entries): ``analysis_grad_mean_mean`` = mean_j G_j,
  ``analysis_grad_std_norm`` = ||sigma||, ``analysis_grad_std_mean`` = mean_j sigma_j and
  ``analysis_grad_snr`` = ||G|| / (||sigma|| + 1e-10);
- the gradient noise scale of McCandlish et al. 2018 (``compute_gradient_noise_scale``), see
  :func:`noise_scale`: ``analysis_noise_trace`` (tr Sigma), ``analysis_noise_grad_sq_norm``
  (|G_true|^2) and ``analysis_grad_noise_scale`` (B_simple = tr Sigma / |G_true|^2);
- with ``analysis.flatness``, the reference's empirical flatness (``compute_flatness``), see
  :func:`flatness`: ``analysis_flatness``, ``analysis_flatness_steps``,
  ``analysis_flatness_distance`` and ``analysis_flatness_capped``.

Nothing here changes the state or draws from a random stream that training uses: the flatness
direction comes from numpy's generator seeded with (``config.seed``, epoch).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdreg.engine.directions import random_direction
from gdreg.engine.fullbatch import FullBatchGradient
from gdreg.engine.mesh import fetch_replicated, replicate
from gdreg.engine.objective import loss_and_accuracy, make_predict_fn
from gdreg.engine.signatures import PyTree

if TYPE_CHECKING:
    from gdreg.program.experiment import Run, TrainState

#: Names of the momentum (first-moment) buffer in optax states: ``optax.trace`` (SGD), Adam's.
MOMENTUM_NAMES = ("trace", "mu")
#: The reference's guard in ``||G|| / (||sigma|| + eps)``.
SNR_EPSILON = 1e-10


class AnalysisEngines(NamedTuple):
    """The engines of one run's analysis (built once per run: each owns compiled functions)."""

    gradients: FullBatchGradient  # training mode, no penalty, block moments
    evaluation: FullBatchGradient  # evaluation mode, forward only (flatness)


_ENGINES: weakref.WeakKeyDictionary[Run, AnalysisEngines] = weakref.WeakKeyDictionary()


def make_gradient_engine(engine: FullBatchGradient) -> FullBatchGradient:
    """``engine`` without the penalty, with ``block_moments``; the running statistics are
    left alone (the "recompute" rule only skips their bookkeeping here)."""
    return engine.replace(penalty=None, block_moments=True, batchnorm_statistics="recompute")


def make_evaluation_engine(engine: FullBatchGradient, run: Run) -> FullBatchGradient:
    """The training blocks' mean cross-entropy in evaluation mode (BatchNorm on the state's
    running statistics), forward only: the reference's ``total_loss`` in ``rollouts.py``."""
    predict = make_predict_fn(run.model)

    def evaluation_loss(params, model_state, inputs, labels):
        loss, accuracy = loss_and_accuracy(predict(params, model_state, inputs), labels)
        return loss, (model_state, {"accuracy": accuracy})

    return engine.replace(
        loss_fn=evaluation_loss, penalty=None, batchnorm_statistics="recompute"
    ).forward_only()


def analysis_engines(run: Run) -> AnalysisEngines:
    """The run's analysis engines, built on first use and kept while the run lives."""
    engines = _ENGINES.get(run)
    if engines is None:
        engines = AnalysisEngines(
            make_gradient_engine(run.engine), make_evaluation_engine(run.engine, run)
        )
        _ENGINES[run] = engines
    return engines


def momentum_buffer(opt_state: optax.OptState, params: PyTree) -> PyTree | None:
    """The optimizer's momentum: the first entry named one of :data:`MOMENTUM_NAMES` in
    ``opt_state`` that is shaped like ``params``; None when the optimizer keeps none."""
    structure = jax.tree.structure(params)

    def shaped_like_params(path, value):
        del path
        return jax.tree.structure(value) == structure

    for name in MOMENTUM_NAMES:
        found = optax.tree_utils.tree_get_all_with_path(
            opt_state, name, filtering=shaped_like_params
        )
        if found:
            return found[0][1]
    return None


@jax.jit
def _norms(params, momentum, grads, block_grad_sq, num_blocks):
    """Device-side reductions: ||theta||, ||m||, ||G||, mean_j G_j, ||sigma||, mean_j sigma_j."""
    leaves = jax.tree.leaves(grads)
    count = sum(leaf.size for leaf in leaves)
    # sigma_j^2 = K / (K - 1) * (mean_B g_Bj^2 - G_j^2); rounding can push it below 0.
    variances = jax.tree.map(
        lambda sq, g: jnp.maximum(sq - jnp.square(g), 0) * (num_blocks / (num_blocks - 1)),
        block_grad_sq,
        grads,
    )
    variance_leaves = jax.tree.leaves(variances)
    return {
        "param_norm": optax.tree.norm(params),
        "momentum_norm": optax.tree.norm(momentum) if momentum is not None else None,
        "grad_norm": optax.tree.norm(grads),
        "grad_mean_mean": sum(jnp.sum(leaf) for leaf in leaves) / count,
        "grad_std_norm": jnp.sqrt(sum(jnp.sum(v) for v in variance_leaves)),
        "grad_std_mean": sum(jnp.sum(jnp.sqrt(v)) for v in variance_leaves) / count,
    }


def noise_scale(
    block_grad_sq_norm: float, grad_sq_norm: float, block_size: int, num_images: int
) -> dict[str, float]:
    """The simple gradient noise scale of McCandlish, Kaplan, Amodei et al., "An Empirical
    Model of Large-Batch Training" (2018), App. A.1, as the reference computes it
    (``compute_gradient_noise_scale`` in ``fullbatch/analysis/analysis.py``).

    Model: the training images are draws from the data distribution, whose per-example
    gradients have mean G_true and covariance Sigma; a block of B images is a batch of B, the
    whole set (N = K * B images, mean gradient G) a batch of N. Then
    E ||g_B||^2 = |G_true|^2 + tr(Sigma) / B and E ||G||^2 = |G_true|^2 + tr(Sigma) / N, and
    solving these two linear equations with the measured m = mean_B ||g_B||^2 and ||G||^2
    (McCandlish's B_small = B, B_big = N) gives estimates that are unbiased by linearity:

        S   = (m - ||G||^2) / (1/B - 1/N)                  E S   = tr(Sigma)
        G^2 = (N ||G||^2 - B m) / (N - B)                  E G^2 = |G_true|^2
        B_simple = S / G^2

    B_simple is a ratio of unbiased estimates and is itself biased (McCandlish et al. note
    this; it is consistent). If instead the training set itself is the population and the
    blocks a uniformly random partition of it (``train.shuffle_blocks``), S is still unbiased,
    for the trace of the per-example covariance with the N - 1 denominator, while ||G||^2 is
    then exact and G^2 falls below it by B / (N - B) * (m - ||G||^2). With BatchNorm a block
    gradient is not a mean of per-example gradients: Sigma is then B times the covariance of
    the block gradients. The reference uses N = the dataset size; here N counts the images in
    the blocks (images left out of every block are not in G). G^2 can come out negative when
    the noise dominates (then B_simple does too). K = 1 block (N = B) defines nothing: NaN.
    m - ||G||^2 is the difference of two sums of the engine's float32 arithmetic, so figures
    with m - ||G||^2 below about 1e-6 * m are rounding.
    """
    if num_images <= block_size:
        nan = float("nan")
        return {"noise_trace": nan, "noise_grad_sq_norm": nan, "grad_noise_scale": nan}
    b, n, m = float(block_size), float(num_images), float(block_grad_sq_norm)
    trace = (m - grad_sq_norm) / (1 / b - 1 / n)
    true_sq_norm = (n * grad_sq_norm - b * m) / (n - b)
    scale = trace / true_sq_norm if true_sq_norm != 0 else float("nan")
    return {"noise_trace": trace, "noise_grad_sq_norm": true_sq_norm, "grad_noise_scale": scale}


@jax.jit
def _moved(params, direction, coefficient):
    return jax.tree.map(lambda p, d: p + (coefficient * d).astype(p.dtype), params, direction)


def flatness(
    run: Run, state: TrainState, layout: np.ndarray, epoch: int, engine: FullBatchGradient
) -> dict[str, float]:
    """The reference's empirical flatness (``perturb2threshold`` in
    ``fullbatch/analysis/rollouts.py``) along one filter-normalized random direction.

    d: a Gaussian direction filter-normalized to theta, zero on biases and BatchNorm
    parameters (:func:`gdreg.engine.directions.random_direction`, Li et al. 2018, the reference's
    ``norm="filter", ignore="biasbn"``), drawn from (``config.seed``, ``epoch``). With
    h = ``analysis.flatness_step_size`` and L(theta) the mean cross-entropy over the
    training blocks in evaluation mode (``engine``, see :func:`make_evaluation_engine`; the
    state's running statistics, which ``train.batchnorm_statistics="recompute"`` refreshes
    only at evaluations), k is the first k = 0, 1, 2, ... with
    L(theta + k h d) > ``analysis.flatness_threshold`` (a non-finite loss counts as above).
    Reported: ``flatness_steps`` = k, ``flatness`` = ||d|| * k (the reference's figure: it
    leaves out h) and ``flatness_distance`` = h * k * ||d|| (the distance travelled). The reference
    searches without end; here k stops at ``analysis.flatness_max_steps`` with ``flatness_capped`` =
    1 when the loss never exceeded the threshold (else 0). The reference also leaves its model at
    the last point; nothing here changes ``state``.
    """
    fields = run.config.analysis
    direction = random_direction(fetch_replicated(state.params), run.config.seed, epoch)
    direction_norm = math.sqrt(
        sum(float(np.sum(np.square(leaf, dtype=np.float64))) for leaf in jax.tree.leaves(direction))
    )
    direction = replicate(direction, run.mesh)
    steps, capped = fields.flatness_max_steps, 1.0
    for k in range(fields.flatness_max_steps + 1):
        at = _moved(state.params, direction, np.float32(k * fields.flatness_step_size))
        result = engine(at, state.model_state, None, run.train_data, layout, epoch)
        loss = float(fetch_replicated(result.metrics["loss"]))
        if not loss <= fields.flatness_threshold:
            steps, capped = k, 0.0
            break
    return {
        "flatness": direction_norm * steps,
        "flatness_steps": float(steps),
        "flatness_distance": fields.flatness_step_size * steps * direction_norm,
        "flatness_capped": capped,
    }


def analysis_metrics(run: Run, state: TrainState) -> dict[str, float]:
    """The analysis metrics of ``state`` (replicated on ``run.mesh``), named ``analysis_*``;
    see the module docstring for their definitions.

    Costs one pass over the blocks with gradients (no penalty), plus up to
    ``analysis.flatness_max_steps + 1`` forward passes with ``analysis.flatness``.
    """
    engines = analysis_engines(run)
    epoch = int(fetch_replicated(state.epoch))
    layout = run.epoch_blocks(epoch)
    num_blocks, block_size = layout.shape
    result = engines.gradients(state.params, state.model_state, None, run.train_data, layout, epoch)
    momentum = momentum_buffer(state.opt_state, state.params)
    norms = fetch_replicated(
        _norms(state.params, momentum, result.grads, result.block_grad_sq, float(num_blocks))
    )
    engine_metrics = fetch_replicated(result.metrics)
    metrics = {
        "param_norm": norms["param_norm"],
        "grad_norm": norms["grad_norm"],
        "block_grad_norm_min": np.sqrt(engine_metrics["block_grad_sq_norm_min"]),
        "block_grad_norm_mean": engine_metrics["block_grad_norm"],
        "block_grad_norm_max": np.sqrt(engine_metrics["block_grad_sq_norm_max"]),
        "grad_mean_mean": norms["grad_mean_mean"],
        "grad_std_norm": norms["grad_std_norm"],
        "grad_std_mean": norms["grad_std_mean"],
        "grad_snr": norms["grad_norm"] / (norms["grad_std_norm"] + SNR_EPSILON),
    }
    if momentum is not None:
        metrics["momentum_norm"] = norms["momentum_norm"]
    if num_blocks < 2:  # no spread among one block
        for key in ("grad_std_norm", "grad_std_mean", "grad_snr"):
            metrics[key] = float("nan")
    metrics.update(
        noise_scale(
            float(engine_metrics["block_grad_sq_norm"]),
            float(norms["grad_norm"]) ** 2,
            block_size,
            num_blocks * block_size,
        )
    )
    if run.config.analysis.flatness:
        metrics.update(flatness(run, state, layout, epoch, engines.evaluation))
    return {f"analysis_{key}": float(value) for key, value in metrics.items()}
