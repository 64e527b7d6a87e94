"""The run directory: what a training run writes to its ``--workdir`` and how it is read back.

    WORKDIR/config.json       the resolved configuration (written at start-up)
    WORKDIR/config_history.jsonl   changes made when resuming (--allow_config_change)
    WORKDIR/loop_shape.json   the engine's loop shape the run trains with (gdreg.program.autotune)
    WORKDIR/.lock             held by the run using the directory (host, pid, since)
    WORKDIR/metrics.jsonl     one JSON object per epoch, with at least ``epoch``
    WORKDIR/events.out.tfevents.*   the same metrics as TensorBoard events (gdreg.program.summaries)
    WORKDIR/pictures/         TensorBoard pictures (the loss landscape), a run of their own
    WORKDIR/checkpoints/N/    orbax checkpoints (gdreg.program.checkpoint)
    WORKDIR/converted_from.json   a run imported from a reference checkpoint: what was read
                              (gdreg.tools.convert_reference)

The only module that knows these names and formats; :mod:`gdreg.program.loop` writes through it,
:mod:`gdreg.tools.report` and :mod:`gdreg.tools.landscape` read through it. It imports no JAX, so
reading runs (the report) stays light. Every problem with a directory is a :class:`RunDirError`
whose one-line message names the file and what is wrong.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import ml_collections

from gdreg.program.config import base_config

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_CHECKPOINT_DIR = "damaged_checkpoints"
#: TensorBoard event files, directly in the run directory so that TensorBoard names the run
#: after it (gdreg.program.summaries).
EVENTS_PATTERN = "events.out.tfevents.*"
#: TensorBoard pictures: a run of their own below the run directory.
PICTURES_DIR = "pictures"
#: Where runs written before the layout above kept their event files.
OLD_TENSORBOARD_DIR = "tensorboard"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".lock"
LOOP_SHAPE_FILE = "loop_shape.json"
CONVERSION_FILE = "converted_from.json"
#: The fields of loop_shape.json that fix the engine's loop (the rest is for the reader).
LOOP_SHAPE_FIELDS = {"blocks_per_microbatch": int, "microbatch_loop": str, "block_loop": str}


class RunDirError(Exception):
    """A run directory cannot be used; the one-line message says why."""


# ----- config.json --------------------------------------------------------------------------


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes ``config`` to ``workdir/config.json`` (sorted keys, indented).

    Through a new file and a rename, so that a kill leaves the old file or the new one.
    """
    _replace(
        os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True)
    )


def _replace(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: a new file, synced, renamed over the old one."""
    partial = path + ".partial"
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def append_config_history(workdir: str, epoch: int, changes: Mapping[str, Any]) -> None:
    """Records, in ``config_history.jsonl``, the fields a run changed when it resumed."""
    line = {
        "resumed_at_epoch": epoch,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "changes": {field: {"from": old, "to": new} for field, (old, new) in changes.items()},
    }
    _append_line(os.path.join(workdir, CONFIG_HISTORY_FILE), json.dumps(line, default=str))


def _append_line(path: str, line: str) -> None:
    """Appends ``line`` and a newline to ``path`` and forces it to disk."""
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _merge(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        current = config.get(key) if key in config else None
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            _merge(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            config[key] = tuple(value)
        else:
            config[key] = value


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's ``config.json`` on top of :func:`gdreg.program.config.base_config`'s defaults.

    Fields the run did not write (an older run) keep their defaults, except
    ``train.batchnorm_statistics``, which is ``"mean"`` (the rule such runs trained with); JSON
    lists become tuples where the schema has tuples.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{workdir}: no {CONFIG_FILE}, not a training run directory")
    try:
        with open(path) as handle:
            values = json.load(handle)
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path}: not JSON ({error})") from None
    if not isinstance(values, dict):
        raise RunDirError(f"{path}: not a JSON object")
    config = base_config()
    # Runs written before train.batchnorm_statistics existed used the order-free rule.
    config.train.batchnorm_statistics = "mean"
    _merge(config, values)
    return config


def write_conversion_record(workdir: str, record: Mapping[str, Any]) -> None:
    """Writes ``record`` (JSON values) to ``workdir/converted_from.json``, atomically."""
    _replace(os.path.join(workdir, CONVERSION_FILE), json.dumps(dict(record), indent=1) + "\n")


# ----- loop_shape.json ----------------------------------------------------------------------


def loop_shape_path(workdir: str) -> str:
    return os.path.join(workdir, LOOP_SHAPE_FILE)


def write_loop_shape(workdir: str, values: Mapping[str, Any]) -> None:
    """Writes the loop shape ``values`` (at least :data:`LOOP_SHAPE_FIELDS`) atomically."""
    _replace(loop_shape_path(workdir), json.dumps(dict(values), indent=2, sort_keys=True) + "\n")


def read_loop_shape(workdir: str) -> dict[str, Any] | None:
    """The run's ``loop_shape.json`` (None if there is none).

    Raises :class:`RunDirError` when it is not a JSON object with :data:`LOOP_SHAPE_FIELDS` of
    their types (a positive ``blocks_per_microbatch``).
    """
    path = loop_shape_path(workdir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            values = json.load(handle)
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path}: not JSON ({error})") from None
    wrong = [
        field
        for field, kind in LOOP_SHAPE_FIELDS.items()
        if not isinstance(values, dict)
        or type(values.get(field)) is not kind
        or (kind is int and values[field] < 1)
    ]
    if wrong:
        raise RunDirError(
            f"{path}: not a loop shape ({', '.join(wrong)} missing or wrong); restore it or set "
            "the loop fields train.blocks_per_microbatch, train.microbatch_loop, "
            "train.block_loop to the values the run trained with"
        )
    return values


# ----- metrics.jsonl ------------------------------------------------------------------------


class MetricsWriter:
    """Appends one JSON object per line to ``workdir/metrics.jsonl``.

    Records of epochs after ``resume_epoch`` (written before an interruption, and to be run
    again) are dropped on construction, so the file reads like an uninterrupted run; the
    records kept are ``previous``. ``enabled=False`` (processes other than 0) writes nothing.
    """

    def __init__(self, workdir: str, resume_epoch: int, *, enabled: bool = True) -> None:
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self.previous: list[dict[str, Any]] = []
        if self.enabled and os.path.exists(self.path):
            records = _parse_metrics(self.path)
            self.previous = [record for record in records if record["epoch"] <= resume_epoch]
            _replace(self.path, "".join(json.dumps(record) + "\n" for record in self.previous))

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends ``record`` and forces it to disk (a kill cannot tear an earlier line)."""
        if self.enabled:
            _append_line(self.path, json.dumps(record))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The metric records of a run, in order (at least one).

    Raises :class:`RunDirError` when there is no ``metrics.jsonl`` (naming run directories one
    level below, for a user who passed their parent), when a line is not a JSON object with an
    ``epoch``, when the epochs do not increase, or when no epoch is recorded yet.
    """
    if not os.path.isdir(workdir):
        raise RunDirError(f"{workdir}: no such directory")
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        runs_below = sorted(
            entry
            for entry in os.listdir(workdir)
            if os.path.isfile(os.path.join(workdir, entry, METRICS_FILE))
        )
        hint = f" (its subdirectories {', '.join(runs_below)} are runs: pass those)"
        raise RunDirError(
            f"{workdir}: no {METRICS_FILE}, not a training run directory"
            + (hint if runs_below else "")
        )
    records = _parse_metrics(path)
    if not records:
        raise RunDirError(f"{path}: no epochs recorded yet")
    for previous, record in itertools.pairwise(records):
        if record["epoch"] <= previous["epoch"]:
            raise RunDirError(
                f"{path}: epoch {record['epoch']} follows epoch {previous['epoch']}; two runs "
                "wrote to this directory, or it was edited"
            )
    return records


def _parse_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short by a kill is left out.

    Only a last line without its newline counts as torn; anything else that is not a record
    raises :class:`RunDirError`.
    """
    with open(path) as handle:
        lines = handle.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines) and not line.endswith("\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if torn:
                logging.warning("%s: leaving out its last line, cut short: %r", path, line[:60])
                continue
            raise RunDirError(f"{path} line {number}: not JSON ({error})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise RunDirError(f"{path} line {number}: not a metrics record")
        records.append(record)
    return records


# ----- the lock ---------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive lock on a run directory, held while a run uses it.

    ``flock`` on ``WORKDIR/.lock``: the operating system releases it when the holder exits,
    however it exits, so a lock left by a killed run is not in the way (on NFSv3 a crashed
    node's lock may last until that node is back). The file names the holder (host, pid, since
    when) for the message a second run gets. On a file system without ``flock`` (Lustre
    mounted without it) the run goes on unlocked, with a warning.
    """

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, LOCK_FILE)
        self._handle = None

    def acquire(self) -> None:
        """Takes the lock; :class:`RunDirError` naming the holder if another run has it."""
        try:
            handle = open(self.path, "a+")  # noqa: SIM115  (held open while the lock is held)
        except OSError as error:
            raise RunDirError(f"cannot create {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                logging.warning("cannot lock %s (%s): running without a lock", self.path, error)
                handle.close()
                return
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"{os.path.dirname(self.path)} is in use by {holder}; wait for that run to end "
                "or use another --workdir"
            ) from None
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"host {socket.gethostname()} pid {os.getpid()} since {since}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
