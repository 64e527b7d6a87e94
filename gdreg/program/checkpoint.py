"""Orbax checkpoints of the training state (:class:`gdreg.program.experiment.TrainState`) in
``WORKDIR/checkpoints/<epoch>/``.

Written by :mod:`gdreg.program.loop`, read back by it on resume and by :mod:`gdreg.tools.landscape`.
A checkpoint is restored replicated over the current mesh, whatever devices and processes wrote
it, so a run can resume on another number of GPUs or nodes.

Each checkpoint carries the run's config (orbax's custom metadata of the step, in
``<epoch>/_CHECKPOINT_METADATA``), so that a resume can check its config against the run's
even when ``config.json`` is gone (:func:`saved_config`). A checkpoint that cannot be written
(a full disk) is a :class:`CheckpointWriteFailed` naming the folder and the space it needs;
the partial step folder is removed and the older checkpoints stay as they were. A checkpoint
that reads but does not fit the state the config builds (another model or width) is a
:class:`CheckpointMismatchError` that says what does not fit; it is never taken for a damaged
one, so it is never moved aside.

Paths. Orbax's path library (``etils.epath``) globs inside a checkpoint with the folder's own
name as part of the pattern, so a workdir such as ``runs/lr[0.1]`` made every checkpoint
unreadable (the brackets matched nothing, and orbax skipped merging the per-process files it had
just written); this module makes that folder part literal (:func:`_literal_glob_folders`). A
backslash cannot be made to work: the storage layer (tensorstore) reads it as a directory
separator and writes the files elsewhere, so :func:`check_path` refuses it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg.engine.mesh import fetch_replicated
from gdreg.engine.signatures import PyTree
from gdreg.program import distributed, rundir
from gdreg.program.rundir import CHECKPOINT_DIR, DAMAGED_CHECKPOINT_DIR, RunDirError

if TYPE_CHECKING:
    from gdreg.program.experiment import TrainState

#: The item name orbax's CheckpointManager gives a single saved item: ``<step>/default``.
ITEM_NAME = "default"
#: The JSON file orbax writes into every step folder, with the step's custom metadata.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
#: The key of the run's config in a step's custom metadata.
CONFIG_KEY = "config"


def _literal_glob_folders() -> None:
    """Makes ``epath.Path(folder).glob(pattern)`` take ``folder`` literally for local paths.

    epath joins the two and globs the result, so glob characters in the folder's name
    (``[``, ``*``, ``?``) act as a pattern; pathlib, whose API epath follows, globs the pattern
    only. Orbax globs that way for the per-process files it merges after a save and reads back.
    """
    from etils.epath import gpath

    original = gpath._GPath.glob
    if getattr(original, "literal_folder", False):
        return
    magic = re.compile(r"[*?\[]")

    def glob_in_folder(self, pattern: str) -> Iterator:
        if self._uri_scheme is not None or not magic.search(self._path_str):
            yield from original(self, pattern)
            return
        yield from original(type(self)(glob.escape(self._path_str)), pattern)

    glob_in_folder.literal_folder = True
    gpath._GPath.glob = glob_in_folder


_literal_glob_folders()


def check_path(workdir: str) -> None:
    """Raises :class:`RunDirError` for a workdir whose checkpoints would not be where orbax
    reads them: a backslash in its absolute path (see the module docstring)."""
    path = os.path.abspath(workdir)
    if "\\" in path:
        raise RunDirError(
            f"--workdir {path} contains a backslash, which orbax's storage (tensorstore) reads "
            "as a directory separator: its checkpoints would be written elsewhere and never "
            "found; choose a path without '\\'"
        )


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Orbax manager for ``workdir/checkpoints``, keeping the newest ``keep`` checkpoints.

    Raises :class:`gdreg.program.rundir.WriteFailed` when the folder cannot be created.
    """
    # Orbax's asynchronous writes stay (save() waits for them): a failed synchronous write
    # leaves tensorstore's callbacks printing tracebacks into a closed event loop, while the
    # background threads report through logging, which save() holds back.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    # A failed read reports already while orbax still tries (each layout of _restore): the
    # filter must be in place before the first read or write.
    _drop_orbax_leftover_reports()
    with rundir.writing(directory, what="the checkpoint folder"):
        return ocp.CheckpointManager(directory, options=options)


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` has a checkpoint directory at all."""
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


def saved_steps(workdir: str) -> list[int]:
    """The epochs of the step folders in ``workdir/checkpoints`` (complete or not), newest
    first; read without orbax, which may clean up on opening."""
    return _steps_in(os.path.join(workdir, CHECKPOINT_DIR))


def _steps_in(directory: str) -> list[int]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted((int(name) for name in names if name.isdigit()), reverse=True)


def saved_config(workdir: str) -> tuple[int, dict[str, Any]] | None:
    """``(epoch, config)``: the config (a JSON object) saved with the newest checkpoint that
    carries one; None if none does (no checkpoints, or all written before checkpoints carried
    their config). Reads files only: nothing is created, moved or locked."""
    for step in saved_steps(workdir):
        path = os.path.join(workdir, CHECKPOINT_DIR, str(step), STEP_METADATA_FILE)
        try:
            with open(path) as handle:
                metadata = json.load(handle)
        except (OSError, ValueError):  # missing or damaged: an older step may carry it
            continue
        custom = metadata.get("custom_metadata") if isinstance(metadata, dict) else None
        config = custom.get(CONFIG_KEY) if isinstance(custom, dict) else None
        if isinstance(config, dict):
            return step, config
    return None


class DamagedCheckpointsError(RunDirError):
    """There are checkpoints, but none of them can be read."""


class CheckpointMismatchError(RunDirError):
    """A checkpoint reads, but holds another state than the config builds (another model,
    width or number of classes): not damaged, and never moved aside."""


class CheckpointWriteFailed(rundir.WriteFailed):
    """A checkpoint could not be written (a full disk); the older ones are intact."""


def restore_latest(
    manager: ocp.CheckpointManager,
    template: TrainState,
    mesh: Mesh,
    *,
    first_step: Callable[[int], int] = lambda epoch: epoch,
    move_damaged: bool = True,
    restart_if_damaged: bool = False,
) -> TrainState | None:
    """The newest checkpoint that can be read, shaped like ``template``; None if there is none.

    The arrays are restored replicated over ``mesh``. A checkpoint that cannot be read (a
    damaged file, an empty or unfinished step folder) on any process is reported in one warning
    line and the next older one is tried; every process takes the same decision (a collective
    call). Steps passed over for an older readable one are damaged: with ``move_damaged``
    (process 0 of a run that holds the workdir's lock) they are moved to
    ``WORKDIR/damaged_checkpoints/``, kept and out of the way of new checkpoints of the same step.

    When no step can be read, the cause may as well be the reader (another state structure, a
    full device): :class:`DamagedCheckpointsError` is raised and nothing is moved, unless
    ``restart_if_damaged``, which moves them all aside and returns None (a fresh start).
    A step that cannot be restored although its metadata reads and shows parameters or model
    state of other shapes than ``template``'s is not damaged but written by another model:
    :class:`CheckpointMismatchError` says what does not fit, and nothing is moved (whatever
    ``restart_if_damaged`` says).

    Checkpoints written before ``TrainState.ema`` existed are read too (their ``ema`` is the
    template's), and so are those of runs without a penalty written before the penalty state
    was always kept (they hold ``penalty_state = {}``): their penalty state is the template's,
    its step count moved to the restored epoch (``first_step(epoch)`` updates).
    """
    damaged: list[int] = []
    first_reason = ""
    state = None
    for step in sorted(manager.all_steps(), reverse=True):
        mismatch = ""
        try:
            candidate, reason = _restore(manager, step, template, mesh, first_step), ""
        except Exception as error:  # orbax raises many kinds of error for a damaged file
            candidate, reason = None, " ".join(f"{type(error).__name__}: {error}".split())[:200]
            _drop_orbax_leftover_reports()
            mismatch = _mismatch(manager, step, template)
        if distributed.all_processes(candidate is not None):
            state = candidate
            break
        if not distributed.all_processes(not mismatch):
            raise CheckpointMismatchError(
                f"the checkpoint of epoch {step} in {manager.directory} does not fit this "
                f"config: {mismatch or 'on another process'}. It reads, and was written by a "
                "run with another model.name, model.width or dataset (number of classes, "
                "image size); resume with that run's config, or use a new --workdir"
            )
        logging.warning(
            "checkpoint %d cannot be read (%s); trying an older one",
            step,
            reason or "on another process",
        )
        first_reason = first_reason or reason
        damaged.append(step)
    if state is None and damaged and not restart_if_damaged:
        raise DamagedCheckpointsError(
            f"no checkpoint in {manager.directory} can be read (steps "
            f"{', '.join(map(str, damaged))}; {first_reason or 'on another process'})"
        )
    if state is None and damaged:
        logging.warning(
            "no checkpoint can be read: starting again from epoch 0 (the unreadable ones go to "
            "%s/)",
            DAMAGED_CHECKPOINT_DIR,
        )
    if damaged:
        if move_damaged:
            _move_aside(manager, damaged)
        distributed.all_processes(True)  # the moves are done before any process lists again
        manager.reload()
    return state


def _restore(
    manager: ocp.CheckpointManager,
    step: int,
    template: TrainState,
    mesh: Mesh,
    first_step: Callable[[int], int],
) -> TrainState:
    # Each step is read by a checkpointer of its own: after a failed read (a damaged step) the
    # manager's own restore can refuse every other step too.
    path = os.path.join(os.fspath(manager.directory), str(step), ITEM_NAME)
    # Older layouts, newest first: before TrainState.ema; before the penalty state was kept
    # (an empty dict inside a NamedTuple target does not match orbax's metadata; in a dict it
    # does).
    current = template._asdict()
    without_ema = {key: value for key, value in current.items() if key != "ema"}
    layouts = (template, without_ema, {**without_ema, "penalty_state": {}})
    first_error = None
    with ocp.StandardCheckpointer() as checkpointer:
        for layout in layouts:
            try:
                state = checkpointer.restore(path, _abstract(layout, mesh))
                break
            except Exception as error:  # a damaged file fails every layout: report the first
                first_error = first_error or error
        else:
            raise first_error
    if isinstance(state, type(template)):
        return state
    state = {**current, **state}
    if isinstance(state["penalty_state"], dict):
        epoch = int(fetch_replicated(state["epoch"]))
        count = np.asarray(first_step(epoch), np.int32)
        state["penalty_state"] = template.penalty_state._replace(count=count)
    return type(template)(**state)


def _mismatch(manager: ocp.CheckpointManager, step: int, template: TrainState) -> str:
    """What in the checkpoint of ``step`` does not fit ``template`` (its parameters or model
    state have other names or shapes), from the checkpoint's metadata; "" when it fits, or
    when the metadata cannot be read (then the checkpoint is damaged)."""
    path = os.path.join(os.fspath(manager.directory), str(step), ITEM_NAME)
    # orbax warns about files of the step it does without: only the answer matters here
    with _held_logs("absl") as held:
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                metadata = checkpointer.metadata(path)
            tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
        except Exception:  # unreadable metadata: a damaged checkpoint
            tree = None
        held.clear()
    if not isinstance(tree, Mapping):
        return ""
    expected = template._asdict()
    for part in ("params", "model_state"):
        saved, built = _shapes(tree.get(part), part), _shapes(expected[part], part)
        for name in sorted(saved.keys() | built.keys()):
            if name not in built:
                return f"it holds {name}, which this config's model does not have"
            if name not in saved:
                return f"this config's model has {name}, which it does not hold"
            if saved[name] != built[name]:
                return (
                    f"{name} has shape {saved[name]} in it and {built[name]} in this config's model"
                )
    return ""


def _shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """``{"params/conv1/kernel": shape}`` for the arrays (or array metadata) of ``tree``."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    elif hasattr(tree, "shape"):
        return {prefix: tuple(int(size) for size in tree.shape)}
    else:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in items:
        shapes.update(_shapes(value, f"{prefix}/{key}"))
    return shapes


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves the step folders ``steps`` to ``WORKDIR/damaged_checkpoints/<step>[.N]``."""
    directory = os.fspath(manager.directory)
    target_root = os.path.join(os.path.dirname(directory), DAMAGED_CHECKPOINT_DIR)
    os.makedirs(target_root, exist_ok=True)
    for step in steps:
        target, copy = os.path.join(target_root, str(step)), 1
        while os.path.exists(target):
            target, copy = os.path.join(target_root, f"{step}.{copy}"), copy + 1
        shutil.move(os.path.join(directory, str(step)), target)


def _abstract(tree: PyTree, mesh: Mesh) -> PyTree:
    """Shapes and dtypes of ``tree``'s leaves, to be restored replicated over ``mesh``."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(
            np.shape(leaf), np.asarray(leaf).dtype, sharding=replicated
        ),
        tree,
    )


def save(
    manager: ocp.CheckpointManager,
    epoch: int,
    state: PyTree,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Saves ``state`` as the checkpoint of ``epoch`` (unless it exists) and waits for it;
    ``config`` (the run's config as a JSON object) is kept with it (:func:`saved_config`).

    Raises :class:`CheckpointWriteFailed` when it cannot be written: the partial step folder
    is removed (by process 0), the message names the folder, the reason and, on a full disk,
    the space a checkpoint takes and the space free.
    """
    if manager.latest_step() == epoch:
        return
    metadata = {CONFIG_KEY: dict(config)} if config is not None else None
    threads = set(threading.enumerate())
    with _held_logs("absl", "asyncio") as held:
        try:
            manager.save(epoch, args=ocp.args.StandardSave(state), custom_metadata=metadata)
            manager.wait_until_finished()
        except Exception as error:  # orbax and tensorstore wrap the system's error their way
            # The one-line error replaces orbax's reports of the same failure (one traceback
            # per background thread, some still running), which are dropped.
            _drop_orbax_leftover_reports()
            logging.getLogger("asyncio").addFilter(_unretrieved_future)
            close(manager)
            _wait_for_threads(threads, seconds=30.0)
            held.clear()
            reason = _system_reason(error)
            if not isinstance(reason, OSError) and jax.process_count() > 1:
                # Not the file system: a collective of the save failed, i.e. another process
                # is gone, and the runtime's own report follows. Logged as an error line of the
                # runtime's format, so that the supervising parent holds it back with that
                # report and names the lost process instead (gdreg.program.supervisor).
                logging.error(
                    "the checkpoint of epoch %d was not written: %s",
                    epoch,
                    " ".join(str(error).split())[:300],
                )
                raise
            raise CheckpointWriteFailed(
                _write_failure(manager, epoch, state, reason), no_room=rundir.no_room(reason)
            ) from None


def close(manager: ocp.CheckpointManager) -> None:
    """Closes ``manager``. After a failed :func:`save` orbax raises that failure again here:
    it was reported already, and is dropped with orbax's log of it."""
    with _held_logs("absl", "asyncio") as held:
        try:
            manager.close()
        except Exception:
            held.clear()


def _drop_orbax_leftover_reports() -> None:
    """Drops, for good, what orbax's failed reads and writes leave to ``sys.unraisablehook``:
    ``RuntimeError: Event loop is closed`` (tensorstore's pending callbacks find orbax's event
    loop closed, possibly long after the failure) and exceptions of orbax's coroutines that
    nobody awaited any more, each with its traceback. The failure itself reaches the caller,
    who reports it once in its own words. Installed once per process; every other report
    passes."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_leftover_reports", False):
        return

    def hook(info):
        closed_loop = (
            info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"
        )
        if not (closed_loop or _raised_in_orbax(info)):
            previous(info)

    hook.drops_orbax_leftover_reports = True
    sys.unraisablehook = hook


#: Where orbax's code lies, to recognize its unawaited coroutines' exceptions.
_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))


def _raised_in_orbax(info: Any) -> bool:
    """Whether an unraisable report (``sys.UnraisableHookArgs``) comes from orbax's code."""
    code = getattr(info.object, "cr_code", None)  # a coroutine closed while it raised
    if code is not None and code.co_filename.startswith(_ORBAX_DIR):
        return True
    frame = info.exc_traceback
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.startswith(_ORBAX_DIR):
            return True
        frame = frame.tb_next
    return False


def _unretrieved_future(record: logging.LogRecord) -> bool:
    """A logging filter: False for asyncio's report of a future whose exception nobody read
    (orbax's writers of a failed save, collected after their loop was given up)."""
    return "exception was never retrieved" not in str(record.msg)


def _wait_for_threads(before: set[threading.Thread], seconds: float) -> None:
    """Waits up to ``seconds`` for the threads started since ``before`` (orbax's writers of a
    failed save, which go on failing and logging for a while); idle pool workers never end
    and are not waited for."""
    deadline = time.monotonic() + seconds
    for thread in threading.enumerate():
        if thread in before or thread is threading.current_thread():
            continue
        target = getattr(thread, "_target", None)
        if getattr(target, "__module__", "") == "concurrent.futures.thread":
            continue  # a pool's worker, waiting for work
        # A thread started outside Python (tensorstore's) cannot be joined, and orbax's
        # threads raise their failure again from join(): reported already.
        with contextlib.suppress(Exception):
            thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _held_logs(*names: str) -> Iterator[list[tuple[logging.Logger, logging.LogRecord]]]:
    """Holds back what the loggers ``names`` log inside; passes it on at the end, except the
    records the caller removed from the yielded list."""
    held: list[tuple[logging.Logger, logging.LogRecord]] = []
    loggers = [logging.getLogger(name) for name in names]

    def hold(logger: logging.Logger) -> Callable[[logging.LogRecord], bool]:
        def keep(record: logging.LogRecord) -> bool:
            held.append((logger, record))
            return False

        return keep

    filters = [(logger, hold(logger)) for logger in loggers]
    for logger, keep in filters:
        logger.addFilter(keep)
    try:
        yield held
    finally:
        for logger, keep in filters:
            logger.removeFilter(keep)
        for logger, record in held:
            logger.handle(record)


def _write_failure(
    manager: ocp.CheckpointManager, epoch: int, state: PyTree, error: BaseException
) -> str:
    directory = os.fspath(manager.directory)
    if jax.process_index() == 0:  # the partial folder holds space, and nothing of value
        for partial in glob.glob(os.path.join(glob.escape(directory), f"{epoch}.orbax-*")):
            shutil.rmtree(partial, ignore_errors=True)
    # What a checkpoint of this run takes: as much as the newest complete one; without one,
    # more than the state's arrays (metadata, and whole blocks of the file system).
    steps = [step for step in _steps_in(directory) if step != epoch]  # the manager is closed
    needed = _folder_size(os.path.join(directory, str(steps[0]))) if steps else 0
    needed_is = "a checkpoint of this run takes about"
    if not needed:
        needed = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))
        needed_is = "its arrays alone take"
    what = f"the checkpoint of epoch {epoch} to"
    return rundir.write_failure(what, directory, error, needed, needed_is)


def _system_reason(error: BaseException) -> BaseException:
    """The ``OSError`` a checkpoint write failed on, where orbax or tensorstore kept it (or
    named it: tensorstore's ``[os_error_code='28']``); else ``error`` itself."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen
        seen = seen.__cause__ or seen.__context__
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        number = int(code.group(1))
        return OSError(number, os.strerror(number))
    return error


def _folder_size(path: str) -> int:
    """Bytes the file system gives ``path`` and everything below it, in whole blocks (as
    ``du``; 0 where it cannot be listed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in [".", *files]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
