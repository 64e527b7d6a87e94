"""train_and_evaluate(config, workdir): the training loop, evaluation and checkpoints.

The run itself (data, model, optimizer, engine) is built by :mod:`gdreg.program.experiment`; this
module runs its epochs (see there for what an epoch is), evaluates, writes the run directory
(:mod:`gdreg.program.rundir`) and checkpoints (:mod:`gdreg.program.checkpoint`).

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
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from gdreg.engine.mesh import fetch_replicated, replicate
from gdreg.engine.train_step import TrainStep
from gdreg.optim import CLIP_NORM_TYPES
from gdreg.program import analysis, autotune, checkpoint, distributed, rundir, summaries
from gdreg.program.config import ConfigError, as_flag, describe_changes, resume_changes
from gdreg.program.experiment import (
    Run,
    TrainState,
    build,
    initial_state,
    recompute_statistics,
)
from gdreg.program.preemption import StopRequest
from gdreg.program.progress import ProgressBar
from gdreg.program.rundir import RunDirError


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN or infinite; the last good checkpoint (if any: the
    message says) is kept."""


class Preempted(Exception):
    """The run stopped early on SIGTERM/SIGINT after saving a checkpoint."""


# ----- the epochs ---------------------------------------------------------------------------


def make_step(run: Run) -> TrainStep:
    """The run's training step (:mod:`gdreg.engine.train_step`): gradient, optimizer update and metrics."""
    optim = run.config.optim
    return TrainStep(
        run.engine,
        run.optimizer.tx,
        run.optimizer.schedule,
        clip_norm=optim.clip_norm,
        clip_norm_type=CLIP_NORM_TYPES[optim.clip_norm_type],
        sam_rho=run.optimizer.sam_rho,
        line_search=run.optimizer.line_search,
        augment_every_step=run.config.train.sample_with_replacement,
    )


def reference_metrics(
    record: dict[str, Any], param_sq_norm: float, weight_decay: float, strength: float
) -> dict[str, float]:
    """The reference implementation's logged figures, under its names with ``reference_``.

    From ``_record_stats`` and ``_modify_gradient_params`` in the reference's
    ``fullbatch/training/training.py``: ``preclip_gradnorm`` is the norm of the mean penalized
    gradient (our ``grad_norm``); ``grad_norm`` is ``sqrt(mean_B ||g_B||^2)`` (the root of our
    ``block_grad_sq_norm``); ``param_norm`` is ``||theta||^2`` before the step; ``full_loss`` is
    ``loss + weight_decay / 2 * ||theta||^2 + lr * strength / 4 * mean_B ||g_B||^2``, although
    the gradient applied descends the penalty with ``lr * strength / 8`` (our
    ``penalized_loss``). Their ``train_loss``, ``train_acc`` and ``clipped_step`` are our
    ``train_loss``, ``train_accuracy`` and ``clipped``. With ``penalty.full_strength > 0`` their
    ``full_loss`` has one more term, ``lr / 4 * acc_strength * ||mean gradient||^2``, which
    is not reproduced here.
    """
    block_sq = record["block_grad_sq_norm"]
    return {
        "reference_preclip_gradnorm": record["grad_norm"],
        "reference_grad_norm": math.sqrt(block_sq),
        "reference_param_norm": param_sq_norm,
        "reference_full_loss": record["train_loss"]
        + weight_decay / 2 * param_sq_norm
        + record["lr"] * strength / 4 * block_sq,
    }


def run_epoch(run: Run, state: TrainState, step: TrainStep) -> tuple[TrainState, dict[str, Any]]:
    """One epoch from ``state`` (device arrays); returns the new state and its metric record.

    The host reads the devices once, at the end of the epoch. Raises
    :class:`TrainingDivergedError` when a step's loss or gradient is not finite; that step and
    every later one were not applied (:mod:`gdreg.engine.train_step`), so a diverged step never
    reaches a checkpoint.
    """
    epoch = int(state.epoch)
    start = time.perf_counter()
    layouts = run.epoch_layouts(epoch)
    first_step = run.plan.first_step(epoch)
    parts = (state.params, state.opt_state, state.model_state, state.penalty_state)
    if run.plan.mode_of(epoch) == "fullbatch":
        (layout,) = layouts
        parts, sums, healthy = step.fullbatch(parts, run.train_data, layout, first_step, epoch)
        first_bad = first_step  # the epoch's one step (read only when it was not applied)
    else:
        parts, sums, healthy, first_bad = step.stochastic_epoch(
            parts, run.train_data, np.concatenate(layouts), first_step, epoch
        )
    for value in jax.tree.leaves(sums):
        value.copy_to_host_async()
    totals = fetch_replicated(sums)
    if not bool(fetch_replicated(healthy)):
        bad = int(fetch_replicated(first_bad))
        raise TrainingDivergedError(
            f"non-finite training loss or gradient norm at epoch {epoch} (step {bad}); the "
            f"epoch's sums: loss {float(totals['loss'])}, gradient norm "
            f"{float(totals['grad_norm'])}"
        )
    params, opt_state, model_state, penalty_state = parts
    ema = state.ema
    if run.config.eval.ema:
        ema = step.moving_average(ema, params, model_state, run.config.eval.ema_momentum)
    seconds = time.perf_counter() - start
    images = int(totals.pop("images"))
    mean = {key: float(value) / len(layouts) for key, value in totals.items()}
    strength = run.config.penalty.strength
    record = {
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
    record.update(
        reference_metrics(record, mean["param_sq_norm"], run.config.optim.weight_decay, strength)
    )
    if "line_search_step" in mean:  # the step size the Armijo search accepted
        record["line_search_step"] = mean["line_search_step"]
    new_state = TrainState(
        epoch=np.asarray(epoch + 1, np.int32),
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        penalty_state=penalty_state,
        ema=ema,
    )
    return new_state, record


def progress_text(record: dict[str, Any], test_accuracy: float | None = None) -> str:
    """The figures of an epoch for the console, short enough for an 80-column bar: training
    loss and accuracy, the learning rate, the latest test accuracy (accuracies in percent)."""
    text = (
        f"loss {record['train_loss']:.4f} acc {100 * record['train_accuracy']:.1f}% "
        f"lr {record['lr']:.4g}"
    )
    if test_accuracy is not None:
        text += f" test {100 * test_accuracy:.1f}%"
    return text


# ----- the program ------------------------------------------------------------------------


def fitted(train_accuracies: list[float], epochs: int) -> bool:
    """Whether the last ``epochs`` (> 0) epochs all reached 100% training accuracy
    (``train.stop_at_full_accuracy``; the reference's ``stop_at_full_training_accuracy``)."""
    return 0 < epochs <= len(train_accuracies) and min(train_accuracies[-epochs:]) == 1.0


def _previous_accuracies(previous: list[dict[str, Any]], count: int) -> list[float]:
    """The training accuracies of the last ``count`` epochs before a resume, as process 0
    read them from ``metrics.jsonl`` (only it reads the file), on every process."""
    if not count:
        return []
    accuracies = [r["train_accuracy"] for r in previous if "train_accuracy" in r][-count:]
    if jax.process_count() == 1:
        return accuracies
    from jax.experimental import multihost_utils

    buffer = np.full(count, np.nan)
    if accuracies:
        buffer[-len(accuracies) :] = accuracies
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return [float(value) for value in buffer if not np.isnan(value)]


def _due(done: int, every: int, last: int) -> bool:
    """Whether epoch ``done`` is one of every ``every`` epochs (0: none) or the last one."""
    return done == last or bool(every and done % every == 0)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop: StopRequest | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains per ``config``, writing metrics and checkpoints to ``workdir``; resumes from it.

    ``stop``: the SIGTERM/SIGINT handler, installed by the caller (``gdreg.main`` does so before
    anything else); by default one is installed for the duration of the call.
    ``allow_config_change``: resume even if ``config`` differs from the run's ``config.json``
    in fields that change the result (see :func:`gdreg.program.config.resume_changes`).

    Returns the last metric record (with the final test metrics). Raises
    :class:`gdreg.program.config.ConfigError` or :class:`gdreg.program.rundir.RunDirError` (one-line
    messages) for what the user must fix, :class:`TrainingDivergedError` and :class:`Preempted`.
    A write the file system refuses (a full disk: a checkpoint, ``metrics.jsonl``, the lock) is
    a :class:`gdreg.program.rundir.WriteFailed` whose message also says where a rerun resumes;
    TensorBoard and the console progress only warn and go off (:mod:`gdreg.program.summaries`).
    """
    # Everything is checked before anything is written: the config, and against the run's.
    run = build(config)
    changes = _resume_config(config, workdir, allow_config_change)
    checkpoint.check_path(workdir)
    try:
        rundir.make_workdir(workdir)
        with contextlib.ExitStack() as cleanup:
            if stop is None:
                stop = cleanup.enter_context(StopRequest())
            cleanup.enter_context(_locked(workdir, jax.process_index() == 0))
            return _train(run, workdir, stop, changes, cleanup)
    except rundir.WriteFailed as error:
        # Every file of the run is replaced atomically or appended and synced, and a failed
        # checkpoint leaves the older ones: the run goes on from its newest checkpoint.
        message = f"{error}; {_how_to_go_on(workdir, error.no_room)}"
        raise type(error)(message, no_room=error.no_room) from None


def _how_to_go_on(workdir: str, no_room: bool) -> str:
    """What to do after a failed write: where a rerun of the same command resumes."""
    steps = checkpoint.saved_steps(workdir)
    fix = "free space there" if no_room else "fix that"
    since = f"the checkpoint of epoch {steps[0]}" if steps else "epoch 0 (no checkpoint yet)"
    return (
        f"nothing written before is lost: {fix} and rerun the same command to resume from {since}"
    )


@contextlib.contextmanager
def _locked(workdir: str, is_first_process: bool):
    """Holds the workdir's lock (process 0 takes it; every process learns whether it could)."""
    lock = rundir.WorkdirLock(workdir)
    problem = None
    if is_first_process:
        try:
            lock.acquire()
        except RunDirError as error:
            problem = error
    if not distributed.all_processes(problem is None):
        raise problem or RunDirError(f"{workdir} is in use by another run")
    try:
        yield
    finally:
        lock.release()


def _resume_config(config: ml_collections.ConfigDict, workdir: str, allow: bool) -> dict:
    """Checks ``config`` against the run's saved config (if any); returns the changes.

    The run's config is its ``config.json``; without one (deleted), the config its newest
    checkpoint carries (:func:`gdreg.program.checkpoint.saved_config`). Checkpoints that carry
    none (written by an older gdreg) and no config.json leave nothing to check against: a
    :class:`RunDirError`, unless ``allow``.
    """
    if os.path.isfile(os.path.join(workdir, rundir.CONFIG_FILE)):
        return resume_changes(rundir.read_config(workdir), config, allow=allow)
    steps = checkpoint.saved_steps(workdir)
    if not steps:
        return {}
    saved = checkpoint.saved_config(workdir)
    if saved is None:
        if not allow:
            raise RunDirError(
                f"{workdir} has checkpoints (the newest of epoch {steps[0]}) but no "
                f"{rundir.CONFIG_FILE}, and they do not carry their config: there is nothing "
                f"to check this config against; restore {rundir.CONFIG_FILE}, or pass "
                "--allow_config_change to resume with this config as it is"
            )
        logging.warning(
            "%s has no %s to check this config against (--allow_config_change): resuming "
            "with this config as it is",
            workdir,
            rundir.CONFIG_FILE,
        )
        return {}
    epoch, values = saved
    source = f"the config saved with the checkpoint of epoch {epoch}"
    logging.warning(
        "%s has no %s: checking this config against %s", workdir, rundir.CONFIG_FILE, source
    )
    saved_config = rundir.config_from_values(values, source)
    return resume_changes(saved_config, config, allow=allow, source=source)


def _restore(run: Run, manager, is_first_process: bool) -> TrainState:
    """The newest readable checkpoint's state, or the initial state (see checkpoint.py)."""
    host_state = initial_state(run)
    restart = run.config.checkpoint.restart_if_damaged
    try:
        restored = checkpoint.restore_latest(
            manager,
            host_state,
            run.mesh,
            first_step=run.plan.first_step,
            move_damaged=is_first_process,
            restart_if_damaged=restart,
        )
    except checkpoint.DamagedCheckpointsError as error:
        flag = as_flag("checkpoint.restart_if_damaged")
        raise RunDirError(f"{error}; rerun with {flag}=True to start again") from None
    if restored is None:
        return host_state
    epoch = int(fetch_replicated(restored.epoch))
    _check_steps_taken(run, epoch, restored.penalty_state)
    logging.info("resuming from the checkpoint of epoch %d", epoch)
    return restored


def _check_steps_taken(run: Run, epoch: int, penalty_state: Any) -> None:
    """Refuses a checkpoint whose optimizer steps differ from what the config's epoch plan
    takes before ``epoch`` (a resume with another mode, batch size or switch): the schedule
    would follow the optimizer's step count and the metrics the plan's, out of step."""
    count = optax.tree_utils.tree_get(penalty_state, "count")
    if count is None:
        return
    taken, planned = int(fetch_replicated(count)), run.plan.first_step(epoch)
    if taken != planned:
        fields = "train.mode, train.batch_size, train.switch_mode_after, train.semi_stochastic"
        raise ConfigError(
            f"the checkpoint of epoch {epoch} took {taken} optimizer steps, and this config "
            f"takes {planned} before that epoch ({fields}): it cannot resume that run; use a "
            "new --workdir"
        )


def _log_images_used(run: Run, epoch: int) -> None:
    """Says how many training images a step uses, and how many it leaves out and why."""
    config = run.config
    used = sum(layout.size for layout in run.epoch_layouts(epoch))
    views = ""
    if run.num_virtual_images != run.dataset.num_train:  # data.augmentation="fixed"
        views = f" x {config.data.copies} augmented copies = {run.num_virtual_images} images"
    logging.info(
        "%s training of %s on %s: %d training images%s, %d used per epoch; "
        "%d devices in %d processes",
        run.plan.mode_of(epoch),
        config.model.name,
        run.dataset.name,
        run.dataset.num_train,
        views,
        used,
        run.mesh.devices.size,
        jax.process_count(),
    )
    dropped = run.num_virtual_images - used
    if dropped:
        mode = run.plan.mode_of(epoch)
        unit = "block" if mode == "fullbatch" else "minibatch"
        size = config.train.block_size if unit == "block" else config.train.batch_size
        logging.warning(
            "%d of %d training images (%.1f%%) are left out of every epoch: they do not fill a "
            "whole %s of %d%s",
            dropped,
            run.num_virtual_images,
            100 * dropped / run.num_virtual_images,
            unit,
            size,
            ""
            if mode == "stochastic" or config.train.shuffle_blocks
            else " (always the same images: the last ones)",
        )


def _train(
    run: Run,
    workdir: str,
    stop: StopRequest,
    changes: dict[str, tuple[Any, Any]],
    cleanup: contextlib.ExitStack,
) -> dict[str, Any]:
    config = run.config
    is_first_process = jax.process_index() == 0
    manager = checkpoint.checkpoint_manager(workdir, config.checkpoint.keep)
    cleanup.callback(checkpoint.close, manager)
    host_state = _restore(run, manager, is_first_process)
    start_epoch = int(host_state.epoch)
    if is_first_process:
        if changes:
            logging.warning("resuming with a changed config: %s", describe_changes(changes))
            rundir.append_config_history(workdir, start_epoch, changes)
        rundir.write_config(workdir, config)
    state = replicate(host_state, run.mesh)
    # The engine's loop shape: stored in the workdir, else timed (gdreg.program.autotune).
    run = autotune.choose_loop_shape(run, state, workdir)
    metrics_writer = rundir.MetricsWriter(workdir, start_epoch, enabled=is_first_process)
    missing = metrics_writer.missing(start_epoch) if is_first_process else []
    if missing:
        logging.warning(
            "%s has no record of epoch%s %s (it was deleted or cut), and the run resumes "
            "from the checkpoint of epoch %d: that history is missing from metrics.jsonl and "
            "TensorBoard",
            metrics_writer.path,
            "s" if len(missing) > 1 else "",
            rundir.describe_epochs(missing),
            start_epoch,
        )
    tensorboard = summaries.TensorBoardWriter(
        workdir,
        config,
        metrics_writer.previous,
        enabled=is_first_process and config.log.tensorboard,
    )
    cleanup.callback(tensorboard.close)
    train_step = make_step(run)
    epochs = config.train.epochs
    # The last moment to stop before the first epoch (which compiles); from here on a signal
    # is answered after the epoch, with a checkpoint.
    if start_epoch < epochs and stop.any_process():
        raise Preempted(f"stopped during start-up, before epoch {start_epoch + 1}; rerun to resume")
    _log_images_used(run, start_epoch)
    # A full-batch epoch is one step; SGD epochs are many steps, so the bar counts epochs there.
    unit = "step" if run.plan.mode == "fullbatch" and not run.plan.switch_after else "epoch"
    progress = ProgressBar(epochs, start=start_epoch, enabled=config.log.progress, unit=unit)
    cleanup.callback(progress.close)
    # The latest test accuracy stays on the console between evaluations.
    test_accuracy = next(
        (r["test_accuracy"] for r in reversed(metrics_writer.previous) if "test_accuracy" in r),
        None,
    )

    def on_test_set(state, params, statistics, suffix=""):
        if run.statistics_engine is not None:  # train.batchnorm_statistics="recompute"
            at_params = state._replace(params=params)
            statistics = replicate(recompute_statistics(run, at_params), run.mesh)
        result = run.evaluator(params, statistics, run.test_data, run.dataset.num_test)
        return statistics, {
            f"test_loss{suffix}": result["loss"],
            f"test_accuracy{suffix}": result["accuracy"],
        }

    def evaluate(state: TrainState) -> tuple[TrainState, dict[str, float]]:
        statistics, metrics = on_test_set(state, state.params, state.model_state)
        state = state._replace(model_state=statistics)  # recomputed ones stay in the checkpoint
        if config.eval.ema:  # the moving average, evaluated beside the weights themselves
            average = state.ema
            metrics.update(on_test_set(state, average["params"], average["model_state"], "_ema")[1])
        return state, metrics

    config_values = json.loads(config.to_json_best_effort())

    def save(state: TrainState) -> None:
        checkpoint.save(manager, int(fetch_replicated(state.epoch)), state, config_values)

    record: dict[str, Any] = {}
    fit_for = config.train.stop_at_full_accuracy
    accuracies = _previous_accuracies(metrics_writer.previous, fit_for)
    # A run that stopped at 100% training accuracy stays stopped.
    first_epoch = epochs if fitted(accuracies, fit_for) else start_epoch
    for epoch in range(first_epoch, epochs):
        try:
            state, record = run_epoch(run, state, train_step)
        except TrainingDivergedError as error:
            latest = manager.latest_step()
            kept = (
                f"the checkpoint of epoch {latest} in {manager.directory} is intact"
                if latest is not None
                else f"no checkpoint was written before it ({as_flag('checkpoint.every_epochs')}"
                f"={config.checkpoint.every_epochs})"
            )
            raise TrainingDivergedError(f"{error}; {kept}") from None
        accuracies.append(record["train_accuracy"])
        done = epoch + 1
        last = done == epochs or fitted(accuracies, fit_for)
        if last or _due(done, config.eval.every_epochs, epochs):
            state, test_metrics = evaluate(state)
            record.update(test_metrics)
        # After the evaluation, whose recomputed BatchNorm statistics (if any) it then uses.
        if config.analysis.every_epochs and (
            last or _due(done, config.analysis.every_epochs, epochs)
        ):
            record.update(analysis.analysis_metrics(run, state))
        metrics_writer.write(record)
        tensorboard.write(record)
        test_accuracy = record.get("test_accuracy", test_accuracy)
        progress.update(done, progress_text(record, test_accuracy))
        if last or _due(done, config.checkpoint.every_epochs, epochs):
            save(state)
        if last and done < epochs:
            logging.info(
                "stopping after epoch %d: the last %d epochs fitted every training image",
                done,
                fit_for,
            )
            break
        if stop.any_process() and done < epochs:
            save(state)
            raise Preempted(f"stopped after epoch {done}; rerun to resume")
    if not record:  # nothing left to train: report the checkpoint's test metrics
        record = {"epoch": start_epoch, **evaluate(state)[1]}
    return record
