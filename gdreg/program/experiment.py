"""A run assembled from its config: data on the devices, model, optimizer, penalty, engine.

The only module that turns config fields into library calls. :func:`build` validates the
config (:func:`gdreg.program.config.validate`), loads the data and puts together the pieces, each
from its own function (:func:`load_data`, :func:`make_model`, :func:`make_optimizer`,
:func:`make_batch_fns`, :func:`make_engine`, :func:`make_evaluator`), into a :class:`Run`.
:mod:`gdreg.program.loop` runs the epochs; :mod:`gdreg.tools.landscape` and :mod:`gdreg.tools.bench`
use the same run to scan the loss and to time a step.

Units: one *epoch* is one pass over the training set. In full-batch mode it is one optimizer
step on the exact gradient over all blocks; in stochastic mode it is ``N // batch_size``
minibatch steps over a fresh permutation (the SGD baseline), each minibatch one block of the
same engine's per-block function, split over the devices (:mod:`gdreg.engine.train_step`). Which
mode an epoch trains in and its steps are the run's plan (:mod:`gdreg.program.epochs`). The
learning-rate schedule moves once per epoch in both modes, as in the reference implementation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh

from gdreg import data
from gdreg.engine.evaluate import Evaluator
from gdreg.engine.fullbatch import FullBatchGradient
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.engine.objective import loss_and_accuracy, make_loss_fn, make_predict_fn
from gdreg.engine.signatures import BatchFn, PyTree
from gdreg.models import registry
from gdreg.models.layers import MOMENTS
from gdreg.optim import CLIP_NORM_TYPES
from gdreg.optim.chain import clip_by_global_norm, optimizer_chain
from gdreg.optim.line_search import ArmijoSettings
from gdreg.optim.schedules import learning_rate_schedule, reference_step_milestones
from gdreg.optim.transforms import kernel_mask, output_layer_mask
from gdreg.penalty.transform import GradientNormPenaltyState, gradient_norm_penalty
from gdreg.program import config as config_lib
from gdreg.program import epochs
from gdreg.program.epochs import EpochPlan, epoch_plan

#: TrainState.ema of a run without eval.ema.
NO_EMA = np.zeros((), np.float32)


class TrainState(NamedTuple):
    """Everything a checkpoint holds: the state after ``epoch`` completed epochs."""

    epoch: Any  # int32 scalar
    params: PyTree
    model_state: PyTree  # BatchNorm statistics ({} for models without)
    opt_state: optax.OptState
    # The penalty is always part of the run; with penalty.strength = full_strength = 0 it
    # passes the gradient through unchanged and only counts steps.
    penalty_state: GradientNormPenaltyState
    # eval.ema: {"params", "model_state"}, their moving average; else a placeholder scalar
    # (orbax cannot restore an empty subtree of a NamedTuple).
    ema: PyTree = NO_EMA


class Optimizer(NamedTuple):
    """The learning-rate schedule, the optax chain it drives, the per-block penalty, and the
    steps that need more than one full-batch evaluation (made by the training loop)."""

    schedule: optax.Schedule
    tx: optax.GradientTransformation
    # The penalty, followed by the per-block clipping when optim.batch_clip > 0.
    penalty: optax.GradientTransformationExtraArgs
    # optim.modification="sam": the radius of gdreg.optim.sam.sam_gradient (None: off).
    sam_rho: float | None = None
    # optim.line_search="armijo": the settings of gdreg.optim.line_search.armijo_step (None: off).
    line_search: ArmijoSettings | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Everything built from the config before the first step."""

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    mesh: Mesh
    model: nn.Module
    optimizer: Optimizer
    engine: FullBatchGradient
    evaluator: Evaluator
    train_data: PyTree  # {"images", "labels"} of the training set, replicated on the mesh
    test_data: PyTree
    num_virtual_images: int  # the training set as augmentation sees it (N x copies)
    steps_per_epoch: int  # optimizer steps of an epoch in train.mode (see plan for a switch)
    plan: EpochPlan  # each epoch's mode and steps (gdreg.program.epochs)
    # train.batchnorm_statistics="recompute": the engine of recompute_statistics (else None)
    statistics_engine: FullBatchGradient | None = None

    def epoch_layouts(self, epoch: int) -> list[np.ndarray]:
        """The block layouts of one epoch: one full-batch layout, or one per minibatch
        (:func:`gdreg.program.epochs.epoch_layouts`; drawn from ``(seed, epoch)`` only, so a
        resumed run repeats them exactly)."""
        return epochs.epoch_layouts(
            self.config, self.plan, epoch, self.num_virtual_images, self.dataset.num_train
        )

    def epoch_blocks(self, epoch: int) -> np.ndarray:
        """All blocks of one epoch in one layout: its full-batch layout, or its minibatches one
        after another (for passes over a whole epoch that are not training steps: BatchNorm
        statistics, analysis, the loss landscape)."""
        layouts = self.epoch_layouts(epoch)
        return layouts[0] if len(layouts) == 1 else np.concatenate(layouts, axis=0)

    def blocks_per_device(self) -> int:
        """The most blocks a device takes in one engine call (the bound of
        ``train.blocks_per_microbatch``; :func:`gdreg.program.epochs.most_blocks`)."""
        blocks = epochs.most_blocks(self.config, self.plan, self.num_virtual_images)
        return math.ceil(blocks / self.mesh.devices.size)


# ----- the pieces ---------------------------------------------------------------------------


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
    """The dataset named by ``config.data``, in host memory.

    A missing TFDS dataset raises :class:`gdreg.data.DatasetNotFoundError` whose message says
    how to prepare it and which flag points gdreg at it.
    """
    fields = config.data
    try:
        with config_lib.blame("data"):
            return data.load_dataset(
                fields.name,
                data_dir=fields.data_dir,
                download=fields.download,
                npz_path=fields.npz_path or None,
                train_size=fields.train_size,
                test_size=fields.test_size,
                seed=config.seed,
                synthetic_shape=tuple(fields.synthetic_shape),
                synthetic_num_classes=fields.synthetic_num_classes,
                synthetic_train_size=fields.synthetic_train_size,
                synthetic_test_size=fields.synthetic_test_size,
            )
    except data.DatasetNotFoundError as error:
        raise data.DatasetNotFoundError(
            f"{error} ({config_lib.as_flag('data.data_dir')}). Without the data, "
            f"{config_lib.as_flag('data.name')}=synthetic runs the same pipeline on synthetic "
            "images, and launch/digits_demo.sh trains on real data that ships with "
            "scikit-learn"
        ) from None


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model of ``config.model`` with ``num_classes`` outputs."""
    with config_lib.blame("model"):
        return registry.create_model(
            config.model.name,
            num_classes=num_classes,
            width=config.model.width,
            dtype=config.model.dtype,
        )


def make_optimizer(
    config: ml_collections.ConfigDict, plan: EpochPlan, num_classes: int | None = None
) -> Optimizer:
    """The schedule and optax chain of ``config.optim`` and the penalty of ``config.penalty``.

    The schedule moves once per epoch (``plan`` maps optimizer steps to epochs); the penalty
    follows it (its coefficient is ``strength * lr_t / 4``). With
    ``optim.batch_clip > 0`` every block's penalized gradient is then clipped (the reference's
    ``batch_clip``, applied after its ``gradreg`` and before the mean): the engine's per-block
    transform becomes ``optax.chain(penalty, clip)``, which hands ``penalty_grad_fn`` and
    ``full_grads`` to the penalty and nothing to the clipping. ``num_classes`` identifies the
    output layer that ``gd_agc`` leaves unclipped (None: every layer is clipped).
    """
    optim, loss = config.optim, config.loss
    norm_type = CLIP_NORM_TYPES[optim.clip_norm_type]
    with config_lib.blame("optim"):
        per_epoch = learning_rate_schedule(
            base_lr=optim.lr,
            schedule=optim.schedule,
            warmup_epochs=optim.warmup_epochs,
            cosine_epochs=optim.cosine_epochs,
            steps_per_epoch=1 if plan.switch_after else plan.steps[plan.mode],
            cosine_floor=optim.cosine_floor,
            milestones=tuple(optim.milestones) or reference_step_milestones(config.train.epochs),
            step_gamma=optim.step_gamma,
            exponential_gamma=optim.exponential_gamma,
            total_epochs=config.train.epochs,
        )
    if plan.switch_after:

        def schedule(step):
            return per_epoch(plan.epoch_of_step(step))

    else:
        schedule = per_epoch
    with config_lib.blame("optim"):
        tx = optimizer_chain(
            schedule,
            name=optim.name,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            weight_decay=optim.weight_decay,
            weight_decay_mask=kernel_mask if optim.weight_decay_linear_only else None,
            clip_norm=optim.clip_norm,
            clip_norm_type=norm_type,
            adam_b1=optim.adam_b1,
            adam_b2=optim.adam_b2,
            adam_eps=optim.adam_eps,
            agc_clipping=optim.agc_clipping,
            agc_eps=optim.agc_eps,
            agc_mask=None if num_classes is None else output_layer_mask(num_classes),
            modification=optim.modification,
            trust_coefficient=optim.trust_coefficient,
            trust_eps=optim.trust_eps,
            norm_bias=loss.norm_bias,
            norm_bias_norm=loss.norm_bias_norm,
            norm_bias_target=loss.norm_bias_target,
            noise_additive=optim.grad_noise_additive,
            noise_multiplicative=optim.grad_noise_multiplicative,
            noise_seed=config.seed,
        )
    with config_lib.blame("penalty"):
        penalty = gradient_norm_penalty(
            strength=config.penalty.strength,
            learning_rate=schedule,
            eps=config.penalty.eps,
            method=config.penalty.method,
            full_strength=config.penalty.full_strength,
            check=False,  # the engine's blocks are right by construction (and it says so per call)
        )
    if optim.batch_clip > 0:
        # After the penalty, as the reference clips gradreg's output.
        penalty = optax.chain(penalty, clip_by_global_norm(optim.batch_clip, norm_type=norm_type))
    line_search = None
    if optim.line_search == "armijo":
        line_search = ArmijoSettings(
            slope_rtol=optim.line_search_slope,
            decrease_factor=optim.line_search_decrease,
            max_backtracking_steps=optim.line_search_steps,
        )
    sam_rho = optim.sam_rho if optim.modification == "sam" else None
    return Optimizer(schedule, tx, penalty, sam_rho=sam_rho, line_search=line_search)


def make_batch_fns(
    config: ml_collections.ConfigDict, dataset: data.Dataset
) -> tuple[BatchFn, BatchFn]:
    """``(train_batch, test_batch)``: images of the device-resident sets, normalized.

    ``train_batch`` augments per ``config.data`` (a function of seed, step and image only);
    ``test_batch`` takes the test images as they are. Both normalize ``(x / 255 - mean) / std``
    in the model's precision (:func:`gdreg.data.input_dtype`: float64 for a float64 model
    traced with ``jax_enable_x64`` on, float32 otherwise, bfloat16 models included), the same
    bits on every machine (:func:`gdreg.data.normalize`).
    """
    augment_key = jax.random.key(config.seed + 1)
    mean, std = dataset.mean, dataset.std
    fields = config.data
    model_dtype = config.model.dtype

    def normalized(images):
        # The dtype is chosen when the batch function is traced, so that a run built outside
        # jax.enable_x64 and evaluated inside it (gdreg.tools.precision) gets float64 inputs.
        return data.normalize(images, mean, std, data.input_dtype(model_dtype))

    def train_batch(images_and_labels, indices, step):
        images, labels = data.augment(
            images_and_labels["images"],
            images_and_labels["labels"],
            indices,
            step,
            key=augment_key,
            augmentation=fields.augmentation,
            copies=fields.copies,
            padding=fields.padding,
            flip=fields.flip,
        )
        return normalized(images), labels

    def test_batch(images_and_labels, indices, step):
        del step
        images = images_and_labels["images"][indices]
        return normalized(images), images_and_labels["labels"][indices]

    return train_batch, test_batch


def loop_settings(
    config: ml_collections.ConfigDict, blocks_per_device: int | None = None
) -> dict[str, Any]:
    """The engine's loop knobs without timing; "" / 0 in the config pick the backend's default.

    One block per call in a Python loop on CPU (XLA:CPU runs convolutions inside loop bodies on
    a slow path); four blocks per call on GPUs, where small blocks are launch-bound. A
    minibatch is one block: for the engine calls over minibatch layouts (analysis, landscape)
    more per call would only add zero-weight padding blocks.
    :mod:`gdreg.program.autotune` times the alternatives.

    ``blocks_per_device`` (:meth:`Run.blocks_per_device`) bounds the blocks per microbatch:
    more would only pad every call with empty blocks (1000 for 4 blocks compiled for minutes);
    a larger config value is cut to it, with a warning.
    """
    one_block = jax.default_backend() == "cpu" or (
        config.train.mode == "stochastic" and not config.train.switch_mode_after
    )
    size = config.train.blocks_per_microbatch or (1 if one_block else 4)
    if blocks_per_device is not None and size > blocks_per_device:
        if config.train.blocks_per_microbatch:
            logging.warning(
                "train.blocks_per_microbatch=%d is more than the %d block%s each device has per "
                "epoch; using %d",
                size,
                blocks_per_device,
                "" if blocks_per_device == 1 else "s",
                blocks_per_device,
            )
        size = blocks_per_device
    return {
        "blocks_per_microbatch": size,
        "microbatch_loop": config.train.microbatch_loop or "python",
        "block_loop": config.train.block_loop or "unroll",
    }


def make_engine(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    train_batch: BatchFn,
    penalty: optax.GradientTransformationExtraArgs,
    mesh: Mesh,
    blocks_per_device: int | None = None,
) -> FullBatchGradient:
    """The sharded full-batch gradient of the model's training loss, with the penalty
    (``blocks_per_device``: see :func:`loop_settings`)."""
    return FullBatchGradient(
        make_loss_fn(model, label_smoothing=config.loss.label_smoothing),
        train_batch,
        mesh=mesh,
        penalty=penalty,
        penalty_full_gradient=config.penalty.full_strength > 0,
        batchnorm_statistics=config.train.batchnorm_statistics,
        **loop_settings(config, blocks_per_device),
    )


def make_evaluator(
    config: ml_collections.ConfigDict, model: nn.Module, test_batch: BatchFn, mesh: Mesh
) -> Evaluator:
    """Test loss and accuracy per ``config.eval``."""
    predict = make_predict_fn(model, flip_average=config.eval.flip_average)
    with config_lib.blame("eval"):
        return Evaluator(predict, test_batch, mesh=mesh, batch_size=config.eval.batch_size)


def make_statistics_engine(engine: FullBatchGradient, model: nn.Module) -> FullBatchGradient:
    """The engine of :func:`recompute_statistics`: the training blocks in eval mode, forward
    only, returning the mean over blocks of every BatchNorm layer's input moments."""

    def moments_fn(params, model_state, inputs, labels):
        estimate = model_state["estimate"]
        logits, moments = model.apply(
            {"params": params, **estimate}, inputs, train=False, mutable=[MOMENTS]
        )
        loss, accuracy = loss_and_accuracy(logits, labels)
        # With momentum 1 the engine's "mean" rule returns the mean of these over the blocks.
        return loss, ({"estimate": estimate, "moments": moments}, {"accuracy": accuracy})

    return engine.replace(
        loss_fn=moments_fn, penalty=None, batchnorm_statistics="mean", batchnorm_momentum=1.0
    ).forward_only()


def recompute_statistics(run: Run, state: TrainState) -> PyTree:
    """The BatchNorm statistics of the whole training set at ``state.params`` (host arrays
    shaped like ``state.model_state``; the state's arrays are replicated on the mesh).

    For ``train.batchnorm_statistics="recompute"`` (see :mod:`gdreg.engine.running_statistics`): at
    every layer the mean and unbiased variance over all pixels of the layer's input, on the images
    of the last epoch's blocks (augmented as its step saw them), with every earlier
    layer normalized by its own whole-set statistics. These are what one train-mode forward
    pass over the whole set as a single batch computes (torch.nn.BatchNorm2d's running
    statistics with momentum 1). Computed block by block, sharded like training: each pass
    runs the blocks in eval mode with the current estimate and sums every layer's input
    moments; a layer whose inputs depend on d earlier BatchNorm layers is exact after d + 1
    passes, so there is one pass per layer, plus one. (No early stop: the moments are taken
    about the current estimate's mean, so in float32 successive passes keep differing in the
    last bits even once every layer is exact.) The passes normalize with the biased variance,
    as a train-mode pass does; the returned variance is the unbiased one (PyTorch's
    running-variance convention), so eval mode on the training set differs from that single
    pass only by the factor n / (n - 1) in the variance, n the set's pixels per channel. The
    result depends only on ``params``, the data and ``epoch``: it starts from mean 0 and
    variance 1, never from earlier statistics, so a resumed run recomputes the same numbers.
    """
    engine = run.statistics_engine
    params = state.params
    epoch = max(int(fetch_replicated(state.epoch)) - 1, 0)
    layout = run.epoch_blocks(epoch)
    template = fetch_replicated(state.model_state)
    if not template:
        return template
    flat = flatten_dict(template)
    estimate = unflatten_dict(
        {k: np.zeros_like(v) if k[-1] == "mean" else np.ones_like(v) for k, v in flat.items()}
    )
    layers = {k[:-1] for k in flat}
    for _ in range(len(layers) + 1):
        probe = {"estimate": estimate, "moments": _zero_moments(layers, flat)}
        result = engine(params, replicate(probe, run.mesh), None, run.train_data, layout, epoch)
        moments = flatten_dict(fetch_replicated(result.model_state)["moments"])
        flat_estimate = flatten_dict(estimate)
        updated, unbiased = {}, {}
        for layer in layers:
            shift = flat_estimate[(*layer, "mean")]
            key = (MOMENTS, *layer[1:])
            first, second = moments[(*key, "mean")], moments[(*key, "square")]
            count = moments[(*key, "count")] * layout.shape[0]
            mean, var = shift + first, second - first * first  # biased, as a train pass uses
            # Downstream of a layer not yet exact, activations may overflow (float32); such a
            # layer starts again from mean 0, variance 1 and is exact once its inputs are.
            finite = np.isfinite(mean) & np.isfinite(var)
            updated[(*layer, "mean")] = np.where(finite, mean, 0)
            updated[(*layer, "var")] = np.where(finite, var, 1)
            unbiased[(*layer, "var")] = updated[(*layer, "var")] * (count / (count - 1))
        estimate = unflatten_dict(
            {k: np.asarray(v, flat_estimate[k].dtype) for k, v in updated.items()}
        )
    result = flatten_dict(estimate)
    result.update({k: np.asarray(v, result[k].dtype) for k, v in unbiased.items()})
    return unflatten_dict(result)


def _zero_moments(layers, flat):
    """Zeros shaped like the moments every BatchNorm layer reports (mean, square, count)."""
    zeros = {}
    for layer in layers:
        mean = flat[(*layer, "mean")]
        key = (MOMENTS, *layer[1:])
        zeros[(*key, "mean")] = np.zeros_like(mean)
        zeros[(*key, "square")] = np.zeros_like(mean)
        zeros[(*key, "count")] = np.zeros((), mean.dtype)
    return unflatten_dict(zeros)


# ----- the whole run ------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field of ``config``: the model's name and dtype (the model registry owns
    them: names are case-insensitive and include registered models), then the schema's fields
    (:func:`gdreg.program.config.validate`). Raises :class:`gdreg.program.config.ConfigError`
    naming the first bad field."""
    with config_lib.blame("model"):
        registry.check_name(config.model.name)
        registry.check_dtype(config.model.dtype)
    config_lib.validate(config)


def build(
    config: ml_collections.ConfigDict,
    dataset: data.Dataset | None = None,
    *,
    mesh: Mesh | None = None,
) -> Run:
    """Validates ``config`` and builds its run (loading the data unless ``dataset`` is given)
    on ``mesh`` (default: every device of every process, :func:`gdreg.engine.mesh.data_mesh`).

    Raises :class:`gdreg.program.config.ConfigError` naming the field for any value that cannot run,
    and :class:`gdreg.data.DatasetNotFoundError` for a TFDS dataset that is not there.
    """
    validate(config)
    if dataset is None:
        dataset = load_data(config)
    with config_lib.blame("data"):
        num_virtual = data.virtual_size(
            dataset.num_train, config.data.augmentation, config.data.copies
        )
    config_lib.check_dataset_fits(config, num_virtual, dataset.num_train)
    plan = epoch_plan(config, num_virtual, dataset.num_train)
    config_lib.check_step_count(config, plan.first_step(config.train.epochs))
    mesh = data_mesh() if mesh is None else mesh
    config_lib.check_devices_fit(config, mesh.devices.size)
    model = make_model(config, dataset.num_classes)
    optimizer = make_optimizer(config, plan, dataset.num_classes)
    train_batch, test_batch = make_batch_fns(config, dataset)
    per_device = math.ceil(epochs.most_blocks(config, plan, num_virtual) / mesh.devices.size)
    engine = make_engine(config, model, train_batch, optimizer.penalty, mesh, per_device)
    statistics_engine = None
    if config.train.batchnorm_statistics == "recompute":
        statistics_engine = make_statistics_engine(engine, model)
    return Run(
        config=config,
        dataset=dataset,
        mesh=mesh,
        model=model,
        optimizer=optimizer,
        engine=engine,
        evaluator=make_evaluator(config, model, test_batch, mesh),
        train_data=replicate(
            {"images": dataset.train_images, "labels": dataset.train_labels}, mesh
        ),
        test_data=replicate({"images": dataset.test_images, "labels": dataset.test_labels}, mesh),
        num_virtual_images=num_virtual,
        steps_per_epoch=plan.steps[plan.mode],
        plan=plan,
        statistics_engine=statistics_engine,
    )


def initial_state(run: Run) -> TrainState:
    """Parameters, model state, optimizer and penalty state at epoch 0 (host arrays)."""
    dataset = run.dataset
    dtype = data.input_dtype(run.config.model.dtype)  # as the batch functions feed the model
    sample = data.normalize(dataset.train_images[:1], dataset.mean, dataset.std, dtype)
    variables = jax.jit(lambda key: run.model.init(key, sample, train=False))(
        jax.random.key(run.config.seed)
    )
    variables = jax.tree.map(np.asarray, variables)
    params = variables.pop("params")
    model_state = dict(variables)
    return TrainState(
        epoch=np.zeros((), np.int32),
        params=params,
        model_state=model_state,
        opt_state=jax.tree.map(np.asarray, run.optimizer.tx.init(params)),
        penalty_state=jax.tree.map(np.asarray, run.optimizer.penalty.init(params)),
        ema=initial_ema(run.config, params, model_state),
    )


def initial_ema(config: ml_collections.ConfigDict, params: PyTree, model_state: PyTree) -> PyTree:
    """``TrainState.ema`` at the start of a run: the weights themselves (as the reference's
    ``copy.deepcopy(model)``), or :data:`NO_EMA` without ``eval.ema``."""
    if not config.eval.ema:
        return NO_EMA
    return jax.tree.map(np.array, {"params": params, "model_state": model_state})
