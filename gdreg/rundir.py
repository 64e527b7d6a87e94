"""The run directory: what a training run writes to its ``--workdir`` and how it is read back.

    WORKDIR/config.json       the resolved configuration (written at start-up)
    WORKDIR/metrics.jsonl     one JSON object per epoch, with at least ``epoch``
    WORKDIR/tensorboard/      the same metrics as TensorBoard events (gdreg.summaries)
    WORKDIR/checkpoints/N/    orbax checkpoints (gdreg.checkpoint)

The only module that knows these names and formats; :mod:`gdreg.train` writes through it,
:mod:`gdreg.report` and :mod:`gdreg.landscape` read through it. It imports no JAX, so reading
runs (the report) stays light. Every problem with a directory is a :class:`RunDirError` whose
one-line message names the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from gdreg.config import base_config

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


class RunDirError(Exception):
    """A run directory cannot be used; the one-line message says why."""


# ----- config.json --------------------------------------------------------------------------


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes ``config`` to ``workdir/config.json`` (sorted keys, indented)."""
    with open(os.path.join(workdir, CONFIG_FILE), "w") as handle:
        handle.write(config.to_json_best_effort(indent=2, sort_keys=True))


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
    """The run's ``config.json`` on top of :func:`gdreg.config.base_config`'s defaults.

    Fields the run did not write (an older run) keep their defaults; JSON lists become tuples
    where the schema has tuples.
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
    _merge(config, values)
    return config


def flatten(tree: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples (JSON has no tuples).

    Accepts a ConfigDict too (its JSON form), so configs compare field by field.
    """
    if isinstance(tree, ml_collections.ConfigDict):
        tree = json.loads(tree.to_json_best_effort())
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


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
            with open(self.path) as handle:
                kept = [line for line in handle if json.loads(line)["epoch"] <= resume_epoch]
            with open(self.path, "w") as handle:
                handle.writelines(kept)
            self.previous = [json.loads(line) for line in kept]

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The metric records of a run, in order (at least one).

    Raises :class:`RunDirError` when there is no ``metrics.jsonl`` (naming run directories one
    level below, for a user who passed their parent), when a line is not a JSON object with an
    ``epoch``, or when no epoch is recorded yet.
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
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunDirError(f"{path} line {number}: not JSON ({error})") from None
            if not isinstance(record, dict) or "epoch" not in record:
                raise RunDirError(f"{path} line {number}: not a metrics record")
            records.append(record)
    if not records:
        raise RunDirError(f"{path}: no epochs recorded yet")
    return records
