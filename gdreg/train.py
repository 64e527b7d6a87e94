"""train_and_evaluate(config, workdir): the training loop, evaluation and checkpoints.

The only module that reads the whole config. One *epoch* is one pass over the training set:
in full-batch mode it is a single optimizer step on the exact gradient over all blocks
(:mod:`gdreg.fullbatch`); in stochastic mode it is ``N // batch_size`` minibatch steps over a
fresh permutation (the SGD baseline). The learning-rate schedule is stepped once per epoch in
both modes, as in the reference implementation.

Reproducibility and preemption: every random draw is a function of (seed, epoch, image), so
a run resumed from a checkpoint in the same workdir repeats exactly the steps an
uninterrupted run would have taken. A checkpoint is written every
``checkpoint.every_epochs`` epochs, at the end, and when the process receives SIGTERM or
SIGINT (SLURM preemption, Ctrl-C): the current epoch finishes, is saved, and the run exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg import data as data_lib
from gdreg.evaluate import Evaluator, flip_averaged
from gdreg.fullbatch import (
    FullBatchGradient,
    block_layout,
    data_mesh,
    fetch_replicated,
    replicate,
)
from gdreg.models import create_model
from gdreg.optim import learning_rate_schedule, sgd_chain
from gdreg.penalty import gradient_norm_penalty
from gdreg.progress import ProgressBar

PyTree = Any
MODES = ("fullbatch", "stochastic")
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class ConfigError(ValueError):
    """A config field has a value the program cannot run with; the message names the field."""


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN or infinite; the last good checkpoint is kept."""


class Preempted(Exception):
    """The run stopped early on SIGTERM/SIGINT after saving a checkpoint."""


# ----- set-up from the config -------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the values that the libraries below would reject late or obscurely."""
    checks = [
        (config.train.mode in MODES, "train.mode", f"must be one of {MODES}"),
        (config.train.epochs >= 1, "train.epochs", "must be at least 1"),
        (config.train.block_size >= 1, "train.block_size", "must be at least 1"),
        (config.train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (config.optim.lr > 0, "optim.lr", "must be positive"),
        (config.penalty.strength >= 0, "penalty.strength", "must be non-negative"),
        (config.penalty.eps > 0, "penalty.eps", "must be positive"),
        (config.eval.every_epochs >= 0, "eval.every_epochs", "must be non-negative"),
        (config.checkpoint.every_epochs >= 0, "checkpoint.every_epochs", "must be >= 0"),
        (config.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1"),
        (config.train.blocks_per_microbatch >= 0, "train.blocks_per_microbatch", "must be >= 0"),
        (config.train.cpu_devices >= 0, "train.cpu_devices", "must be >= 0"),
    ]
    for ok, field, message in checks:
        if not ok:
            raise ConfigError(f"{field} {message}, got {_field(config, field)!r}")


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _loop_defaults(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Block-loop knobs; "" / 0 pick the backend default (see gdreg.fullbatch)."""
    on_cpu = jax.default_backend() == "cpu"
    return {
        "blocks_per_microbatch": config.train.blocks_per_microbatch or (1 if on_cpu else 4),
        "microbatch_loop": config.train.microbatch_loop or "python",
        "block_loop": config.train.block_loop or "unroll",
    }


def make_loss_fn(model):
    """Mean cross-entropy of one block in training mode (BatchNorm on the block's statistics)."""

    def loss_fn(params, model_state, inputs, labels):
        variables = {"params": params, **model_state}
        if model_state:
            logits, new_state = model.apply(
                variables, inputs, train=True, mutable=list(model_state)
            )
        else:
            logits, new_state = model.apply(variables, inputs, train=True), {}
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (new_state, {"accuracy": accuracy})

    return loss_fn


def make_predict_fn(model):
    """Logits in evaluation mode (BatchNorm on its running statistics)."""

    def predict(params, model_state, inputs):
        return model.apply({"params": params, **model_state}, inputs, train=False)

    return predict


@dataclass
class Run:
    """Everything built from the config before the first step."""

    config: ml_collections.ConfigDict
    dataset: data_lib.Dataset
    mesh: Any
    model: Any
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    penalty: Any
    engine: FullBatchGradient
    evaluator: Evaluator
    train_data: PyTree
    test_data: PyTree
    num_virtual_images: int
    steps_per_epoch: int


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    """The dataset named by ``config.data``."""
    d = config.data
    return data_lib.load_dataset(
        d.name,
        data_dir=d.data_dir,
        download=d.download,
        npz_path=d.npz_path or None,
        train_size=d.train_size,
        test_size=d.test_size,
        seed=config.seed,
        synthetic_shape=tuple(d.synthetic_shape),
        synthetic_num_classes=d.synthetic_num_classes,
        synthetic_train_size=d.synthetic_train_size,
        synthetic_test_size=d.synthetic_test_size,
    )


def build(config: ml_collections.ConfigDict, dataset: data_lib.Dataset | None = None) -> Run:
    """Builds the model, optimizer, penalty, sharded data and compiled step functions."""
    validate_config(config)
    if dataset is None:
        try:
            dataset = load_data(config)
        except ValueError as error:  # the data module names the offending field
            raise ConfigError(str(error)) from None
    mesh = data_mesh()
    try:
        model = create_model(
            config.model.name,
            num_classes=dataset.num_classes,
            width=config.model.width or None,
            dtype=config.model.dtype,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None

    num_train = len(dataset.train_images)
    num_virtual = data_lib.virtual_size(num_train, config.data.augmentation, config.data.copies)
    if config.train.mode == "fullbatch":
        steps_per_epoch = 1
        if config.train.block_size > num_virtual:
            raise ConfigError(
                f"train.block_size {config.train.block_size} is larger than the "
                f"{num_virtual} training images"
            )
    else:
        if config.train.batch_size > num_virtual:
            raise ConfigError(
                f"train.batch_size {config.train.batch_size} is larger than the "
                f"{num_virtual} training images"
            )
        steps_per_epoch = num_virtual // config.train.batch_size

    try:
        schedule = learning_rate_schedule(
            base_lr=config.optim.lr,
            schedule=config.optim.schedule,
            warmup_epochs=config.optim.warmup_epochs,
            cosine_epochs=config.optim.cosine_epochs,
            steps_per_epoch=steps_per_epoch,
        )
        tx = sgd_chain(
            schedule,
            momentum=config.optim.momentum,
            nesterov=config.optim.nesterov,
            weight_decay=config.optim.weight_decay,
            clip_norm=config.optim.clip_norm,
        )
        penalty = None
        if config.penalty.strength > 0 or config.penalty.full_strength > 0:
            penalty = gradient_norm_penalty(
                strength=config.penalty.strength,
                learning_rate=schedule,
                eps=config.penalty.eps,
                method=config.penalty.method,
                full_strength=config.penalty.full_strength,
            )
    except ValueError as error:
        message = str(error)
        if "penalty" not in message and "optim." not in message:
            message = f"penalty: {message}"
        raise ConfigError(message) from None

    augment_key = jax.random.key(config.seed + 1)
    mean, std = dataset.mean, dataset.std

    def train_batch(data, indices, step):
        images, labels = data_lib.augment(
            data["images"],
            data["labels"],
            indices,
            step,
            key=augment_key,
            augmentation=config.data.augmentation,
            copies=config.data.copies,
            padding=config.data.padding,
            flip=config.data.flip,
        )
        return data_lib.normalize(images, mean, std), labels

    def test_batch(data, indices, step):
        del step
        return data_lib.normalize(data["images"][indices], mean, std), data["labels"][indices]

    predict = make_predict_fn(model)
    if config.eval.flip_average:
        predict = flip_averaged(predict)
    engine = FullBatchGradient(
        make_loss_fn(model), train_batch, mesh=mesh, penalty=penalty, **_loop_defaults(config)
    )
    evaluator = Evaluator(predict, test_batch, mesh=mesh, batch_size=config.eval.batch_size)
    train_data = replicate({"images": dataset.train_images, "labels": dataset.train_labels}, mesh)
    test_data = replicate({"images": dataset.test_images, "labels": dataset.test_labels}, mesh)
    return Run(
        config=config,
        dataset=dataset,
        mesh=mesh,
        model=model,
        schedule=schedule,
        tx=tx,
        penalty=penalty,
        engine=engine,
        evaluator=evaluator,
        train_data=train_data,
        test_data=test_data,
        num_virtual_images=num_virtual,
        steps_per_epoch=steps_per_epoch,
    )


def initial_state(run: Run) -> dict[str, PyTree]:
    """Parameters, model state, optimizer and penalty state at epoch 0 (on the host)."""
    sample = data_lib.normalize(run.dataset.train_images[:1], run.dataset.mean, run.dataset.std)
    variables = jax.jit(lambda key: run.model.init(key, sample, train=False))(
        jax.random.key(run.config.seed)
    )
    variables = jax.tree.map(np.asarray, variables)
    params = variables.pop("params")
    model_state = dict(variables)
    return {
        "epoch": np.zeros((), np.int32),
        "params": params,
        "model_state": model_state,
        "opt_state": jax.tree.map(np.asarray, run.tx.init(params)),
        "penalty_state": (
            jax.tree.map(np.asarray, run.penalty.init(params)) if run.penalty else {}
        ),
    }


# ----- the epochs ---------------------------------------------------------------------------


def epoch_layouts(run: Run, epoch: int) -> list[np.ndarray]:
    """The block layouts of one epoch: one full-batch layout, or one per minibatch."""
    config = run.config
    seed = [config.seed, epoch]
    if config.train.mode == "fullbatch":
        shuffle = config.train.shuffle_blocks
        layout = block_layout(
            run.num_virtual_images,
            config.train.block_size,
            permutation_seed=np.random.SeedSequence(seed).generate_state(1)[0] if shuffle else None,
        )
        return [layout]
    order = np.random.default_rng(seed).permutation(run.num_virtual_images).astype(np.int32)
    size = config.train.batch_size
    return [order[i * size : (i + 1) * size][None] for i in range(run.steps_per_epoch)]


def make_apply_update(tx: optax.GradientTransformation):
    """The jitted optimizer step: (params, opt_state, grads) -> (new params, new opt_state)."""

    @jax.jit
    def apply_update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return apply_update


def run_epoch(run: Run, state: dict[str, PyTree], apply_update) -> tuple[dict, dict[str, float]]:
    """One epoch from ``state`` (device arrays); returns the new state and its metrics.

    Raises :class:`TrainingDivergedError` before applying an update whose loss or gradient
    is not finite, so a diverged step never reaches a checkpoint.
    """
    epoch = int(state["epoch"])
    start = time.perf_counter()
    totals: dict[str, float] = {}
    params, model_state = state["params"], state["model_state"]
    opt_state, penalty_state = state["opt_state"], state["penalty_state"]
    layouts = epoch_layouts(run, epoch)
    images = 0
    for index, layout in enumerate(layouts):
        step = epoch * run.steps_per_epoch + index
        result = run.engine(
            params, model_state, penalty_state or None, run.train_data, layout, epoch
        )
        metrics = fetch_replicated(result.metrics)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            raise TrainingDivergedError(
                f"non-finite training loss {metrics['loss']} or gradient norm "
                f"{metrics['grad_norm']} at epoch {epoch} (step {step})"
            )
        lr = float(run.schedule(step))
        metrics["lr"] = lr
        metrics["clipped"] = float(
            run.config.optim.clip_norm > 0 and metrics["grad_norm"] > run.config.optim.clip_norm
        )
        params, opt_state = apply_update(params, opt_state, result.grads)
        model_state = result.model_state
        penalty_state = result.penalty_state if run.penalty else penalty_state
        images += int(metrics.pop("images"))
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    mean = {key: value / len(layouts) for key, value in totals.items()}
    strength = run.config.penalty.strength
    out = {
        "epoch": epoch + 1,
        "train_loss": mean["loss"],
        "train_accuracy": mean["accuracy"],
        # the objective the penalty descends: L + strength * lr / 8 * mean_B ||grad L_B||^2
        "penalized_loss": mean["loss"] + strength * mean["lr"] / 8 * mean["block_grad_sq_norm"],
        "block_grad_sq_norm": mean["block_grad_sq_norm"],
        "grad_norm": mean["grad_norm"],
        "clipped": mean["clipped"],
        "lr": mean["lr"],
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds,
    }
    new_state = {
        "epoch": np.asarray(epoch + 1, np.int32),
        "params": params,
        "model_state": model_state,
        "opt_state": opt_state,
        "penalty_state": penalty_state,
    }
    return new_state, out


# ----- files: metrics, config, checkpoints ---------------------------------------------------


class MetricsWriter:
    """Appends one JSON object per line to ``workdir/metrics.jsonl`` (process 0 only)."""

    def __init__(self, workdir: str, resume_epoch: int) -> None:
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(self.path):
            # Lines written after the checkpoint we resume from describe epochs that will be
            # run again; drop them so the file reads like an uninterrupted run.
            with open(self.path) as handle:
                kept = [line for line in handle if json.loads(line)["epoch"] <= resume_epoch]
            with open(self.path, "w") as handle:
                handle.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The metric records a run wrote, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Orbax manager for ``workdir/checkpoints``, keeping the newest ``keep`` checkpoints."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options
    )


def restore_latest(
    manager: ocp.CheckpointManager, template: dict, mesh: Mesh | None = None
) -> dict | None:
    """The newest checkpoint's state, shaped like ``template``, or None if there is none.

    The state is restored replicated over ``mesh``, whatever the devices and processes that
    wrote it, so a run can resume on another number of GPUs or nodes.
    """
    latest = manager.latest_step()
    if latest is None:
        return None
    replicated = NamedSharding(data_mesh() if mesh is None else mesh, P())
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(
            np.shape(leaf), np.asarray(leaf).dtype, sharding=replicated
        ),
        template,
    )
    return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


class _StopRequest:
    """Remembers a SIGTERM/SIGINT so the loop can checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught; leave them alone there.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("received signal %d: finishing this epoch, then checkpointing", signum)
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))


def _progress_text(record: dict[str, Any]) -> str:
    text = (
        f"loss {record['train_loss']:.4f} acc {record['train_accuracy']:.3f} "
        f"|g| {record['grad_norm']:.3f} lr {record['lr']:.4f} {record['seconds']:.2f}s/epoch"
    )
    if "test_accuracy" in record:
        text += f" test {record['test_accuracy']:.4f}"
    return text


# ----- the program ------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config``, writing metrics and checkpoints to ``workdir``; resumes from it.

    Returns the last metric record (with the final test metrics).
    """
    run = build(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as handle:
            handle.write(config.to_json_best_effort(indent=2, sort_keys=True))

    manager = checkpoint_manager(workdir, config.checkpoint.keep)
    host_state = initial_state(run)
    restored = restore_latest(manager, host_state, run.mesh)
    if restored is not None:
        host_state = restored
        logging.info("resuming from the checkpoint of epoch %d", int(host_state["epoch"]))
    state = replicate(host_state, run.mesh)
    start_epoch = int(host_state["epoch"])
    metrics_writer = MetricsWriter(workdir, start_epoch)
    progress = ProgressBar(config.train.epochs, start=start_epoch, enabled=config.log.progress)
    apply_update = make_apply_update(run.tx)
    logging.info(
        "%s training of %s on %s: %d training images (%d virtual), %d devices in %d processes",
        config.train.mode,
        config.model.name,
        run.dataset.name,
        len(run.dataset.train_images),
        run.num_virtual_images,
        run.mesh.devices.size,
        jax.process_count(),
    )

    def evaluate(params, model_state) -> dict[str, float]:
        result = run.evaluator(params, model_state, run.test_data, len(run.dataset.test_images))
        return {"test_loss": result["loss"], "test_accuracy": result["accuracy"]}

    def save(state_to_save) -> None:
        epoch = int(fetch_replicated(state_to_save["epoch"]))
        if manager.latest_step() != epoch:
            manager.save(epoch, args=ocp.args.StandardSave(state_to_save))
            manager.wait_until_finished()

    record: dict[str, Any] = {}
    try:
        with _StopRequest() as stop:
            for epoch in range(start_epoch, config.train.epochs):
                state, record = run_epoch(run, state, apply_update)
                done = epoch + 1
                every = config.eval.every_epochs
                if done == config.train.epochs or (every and done % every == 0):
                    record.update(evaluate(state["params"], state["model_state"]))
                metrics_writer.write(record)
                progress.update(done, _progress_text(record))
                every = config.checkpoint.every_epochs
                if done == config.train.epochs or (every and done % every == 0):
                    save(state)
                if stop.any_process() and done < config.train.epochs:
                    save(state)
                    raise Preempted(f"stopped after epoch {done}; rerun to resume")
        if not record:  # nothing left to train: report the checkpoint's test metrics
            record = {"epoch": start_epoch, **evaluate(state["params"], state["model_state"])}
    finally:
        manager.close()
    return record
