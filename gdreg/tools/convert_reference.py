"""The paper authors' published checkpoints as gdreg run directories.

    python -m gdreg.tools.convert_reference FILE.pth --workdir DIR
                    [--row ROW] [--model MODEL] [--epoch N] [--momentum file|zero]
    python -m gdreg.tools.convert_reference FILE.pth --workdir DIR --config configs/paper.py:MODEL,ROW
                    [--config.FIELD=VALUE ...]

The authors of Geiping et al. (ICLR 2022) published trained weights of five runs
(github.com/JonasGeiping/fullbatchtraining, ``hubconf.py``; see docs/convert_reference.md for
where to download them). Each file is what their training loop checkpoints
(``_save_to_checkpoint`` in ``fullbatch/training/utils.py``): the list ``[optimizer state,
model state, scheduler state, scaler state, step]``, of which their ``hubconf.py`` keeps the
model state. This reads the file without running pickled code (``torch.load(...,
weights_only=True)``; PyTorch is the optional extra ``gdreg[torch]``), maps every tensor to
gdreg's variables (:mod:`gdreg.models.reference_names`: kernels OIHW -> HWIO, the classifier
transposed, BatchNorm ``running_mean``/``running_var`` to ``batch_stats``), and writes a run
directory that ``gdreg.main``, ``gdreg.tools.landscape``, ``gdreg.tools.precision`` and
``gdreg.tools.evaluate`` take: ``config.json``, one orbax checkpoint at the epoch the file
records (3000 for the published runs), and ``converted_from.json`` (what was read and how).

What the checkpoint holds besides the weights:

* the **config** of the paper row the run trained with: the file name of a published checkpoint
  says which (:data:`PUBLISHED`: ``highreg`` is "FB strong reg.", blocks of 32; ``gradreg``
  "FB regularized"; ``clip`` "FB clipped"; ``highreg_shuffle`` "FB in practice"; ``lr16``
  the regularized row at twice the learning rate), ``--row``/``--model`` or ``--config`` say it
  for any other file;
* the **momentum buffers** of the file's optimizer state (torch's SGD with dampening 0 keeps
  ``buf = m * buf + g``, the trace of gdreg's optax chain; ``--momentum=zero`` starts them at
  zero). The reference's optimizer indexes its state by position in ``model.parameters()``;
  :func:`gdreg.models.reference_names.parameter_order` gives that order;
* the **step counts** of the optimizer and the penalty: the epoch, so the learning rate of the
  next epoch is the schedule's at that epoch (the file's scheduler state is not needed: gdreg's
  schedule is a function of the step; the file's next learning rate is compared with it);
* no ``num_batches_tracked`` counters (gdreg has no counterpart; they are dropped and recorded
  in ``converted_from.json``), and no moving average of the weights (the published runs had none).

Anything that does not fit (an unknown or missing key, a wrong shape, another architecture, a
file that is not a state) is one ``error:`` line naming the key, exit status 2, and nothing is
written: the run directory is assembled in a hidden sibling folder and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from gdreg.data.sources import declared_shape
from gdreg.engine.mesh import data_mesh, replicate
from gdreg.models import reference_names
from gdreg.models.resnet import ResNet
from gdreg.program import checkpoint, cli, exitcodes, experiment, rundir
from gdreg.program.config import PAPER_TABLE, ROW_TITLES, ConfigError, paper_config, set_field
from gdreg.program.epochs import FULLBATCH, epoch_plan

FLAGS = flags.FLAGS

#: The extra that brings PyTorch: ``pip install "gdreg[torch]"``.
TORCH_EXTRA = "torch"
#: How the reference's training loop checkpoints (``_save_to_checkpoint``).
TUPLE_FIELDS = ("optimizer", "model", "scheduler", "scaler", "step")


@dataclasses.dataclass(frozen=True)
class Published:
    """A checkpoint the authors published: their model and run name, gdreg's paper row and the
    fields that differ from the row (train.sh names the run; hubconf.py lists the files)."""

    model: str
    row: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""


#: The files of their hubconf.py (``model_urls``), by name without ``.pth``.
PUBLISHED: dict[str, Published] = {
    "final_fbaug_highreg_lr08_resnet18": Published(
        "resnet18", "strong", note="train.sh: hyp=gradreg data.batch_size=32 (FB strong reg.)"
    ),
    "final_fbaug_gradreg_lr08_resnet18": Published(
        "resnet18", "regularized", note="train.sh: hyp=gradreg (FB regularized)"
    ),
    "final_fbaug_gradreg_lr16_resnet18": Published(
        "resnet18",
        "regularized",
        {"optim.lr": 1.6},
        note="hubconf.py: the gradreg hyperparameters at twice the arXiv version's lr",
    ),
    "final_fbaug_clip_lr04_resnet18": Published(
        "resnet18", "clipped", note="train.sh: hyp=fbclip (FB clipped)"
    ),
    "final_fbaug_highreg_lr08_shuffle_resnet152": Published(
        "resnet152",
        "practice",
        note="train.sh: hyp=gradreg data.batch_size=32 hyp.shuffle=True (FB in practice)",
    ),
}
#: The file's step, when it has none (a bare state dict): the published runs' length.
DEFAULT_EPOCH = 3000


class ConversionError(Exception):
    """The file cannot become a gdreg run directory; the one-line message says why."""


@dataclasses.dataclass(frozen=True)
class ReferenceFile:
    """What a reference checkpoint holds, as numpy arrays and plain values."""

    path: str
    layout: str  # "tuple" (the training loop's five entries) or "state_dict"
    model_state: dict[str, np.ndarray]  # in the file's order
    optimizer_state: Mapping[str, Any] | None = None
    scheduler_state: Any = None
    step: int | None = None


# ----- reading ------------------------------------------------------------------------------


def torch_available() -> bool:
    """Whether PyTorch can be imported here (the optional extra ``gdreg[torch]``)."""
    return importlib.util.find_spec("torch") is not None


def missing_torch_message(path: str) -> str:
    return (
        f"reading {path} needs PyTorch, which is not installed here: "
        f'pip install "gdreg[{TORCH_EXTRA}]"'
    )


def read_reference_file(path: str) -> ReferenceFile:
    """The tensors and values of a reference checkpoint: the published five-entry list
    (:data:`TUPLE_FIELDS`) or a bare ``state_dict``. Loaded with ``weights_only=True``, so
    only tensors and plain containers are unpickled, never code."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if not torch_available():
        raise ConversionError(missing_torch_message(path))
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch's own errors alike
        reason = " ".join(str(error).split())
        if "Unsupported global" in reason:
            reason = reason[reason.index("Unsupported global") :].split(". ")[0]
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint that loads with weights_only=True "
            f"({type(error).__name__}: {reason[:300]})"
        ) from None
    if isinstance(loaded, list | tuple) and len(loaded) == len(TUPLE_FIELDS):
        optimizer_state, model_state, scheduler_state, _, step = loaded
        if not _is_state_dict(model_state, torch):
            raise ConversionError(
                f"{path}: entry 1 of the checkpoint list (the model's state_dict) is a "
                f"{type(model_state).__name__}, not a mapping of names to tensors"
            )
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ConversionError(f"{path}: entry 4 (the step) is {step!r}, not a step count")
        return ReferenceFile(
            path,
            "tuple",
            _to_numpy(model_state, torch),
            optimizer_state=_to_numpy(optimizer_state, torch),
            scheduler_state=_to_numpy(scheduler_state, torch),
            step=step,
        )
    if _is_state_dict(loaded, torch):
        return ReferenceFile(path, "state_dict", _to_numpy(loaded, torch))
    raise ConversionError(
        f"{path}: holds a {type(loaded).__name__}, neither the reference's checkpoint list "
        f"({', '.join(TUPLE_FIELDS)}) nor a state_dict"
    )


def _is_state_dict(value: Any, torch: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _to_numpy(value: Any, torch: Any) -> Any:
    """``value`` with every tensor a numpy array (floating ones at least float32), the
    containers rebuilt as dicts (in their order) and lists."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.to(torch.float32)  # float16/bfloat16 have no exact numpy twin
        return tensor.contiguous().numpy()
    if isinstance(value, Mapping):
        return {key: _to_numpy(item, torch) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_numpy(item, torch) for item in value]
    return value


# ----- the config -----------------------------------------------------------------------------


def published_entry(path: str) -> tuple[str, Published | None]:
    """The file's name without ``.pth`` and its :data:`PUBLISHED` entry (None if not one)."""
    name = os.path.basename(path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    return name, PUBLISHED.get(name)


def default_config(path: str, model: str | None, row: str | None) -> ml_collections.ConfigDict:
    """The config of the run that wrote ``path``: the paper row ``row`` of ``model``, each taken
    from the file's name where it is a published one (:data:`PUBLISHED`), with the published
    run's other settings when both are its own."""
    _, published = published_entry(path)
    if published is None and (model is None or row is None):
        needed = " and ".join(
            flag for flag, value in (("--model", model), ("--row", row)) if value is None
        )
        raise ConversionError(
            f"{path}: not one of the published names ({', '.join(PUBLISHED)}): say which "
            f"run it is with {needed} (or --config)"
        )
    model = model or published.model
    row = row or published.row
    if row not in PAPER_TABLE:
        raise ConversionError(
            f"--row {row!r} is not a row of the paper; known: {tuple(PAPER_TABLE)}"
        )
    config = paper_config(model.strip().lower(), row)
    if published is not None and (model, row) == (published.model, published.row):
        for field, value in published.overrides.items():
            set_field(config, field, value)
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """The config is one gdreg can run and trains in full batches, as the published runs did
    (the step count of another mode at an epoch depends on the data set's size, which the
    converter does not load)."""
    experiment.validate(config)
    if config.train.mode != FULLBATCH or config.train.switch_mode_after:
        raise ConfigError(
            f"train.mode: the converter writes full-batch runs (as the published ones are), got "
            f"{config.train.mode!r}"
            + (
                f" switching after {config.train.switch_mode_after}"
                if config.train.switch_mode_after
                else ""
            )
        )


# ----- the state ------------------------------------------------------------------------------


def _variables_shapes(model: ResNet, channels: int) -> Any:
    sample = jnp.zeros((1, 32, 32, channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))


def _set_counts(tree: Any, count: int) -> Any:
    """``tree`` with every optax ``count`` field at ``count`` (its dtype kept)."""
    return _replace_named(tree, "count", lambda old: np.asarray(count, np.asarray(old).dtype))


def _replace_named(tree: Any, name: str, fn) -> Any:
    """``tree`` with the field ``name`` of every NamedTuple state replaced by ``fn(old)``."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        values = {
            field: fn(value) if field == name else _replace_named(value, name, fn)
            for field, value in zip(tree._fields, tree, strict=True)
        }
        return type(tree)(**values)
    if isinstance(tree, tuple | list):
        return type(tree)(_replace_named(item, name, fn) for item in tree)
    if isinstance(tree, dict):
        return {key: _replace_named(value, name, fn) for key, value in tree.items()}
    return tree


def momentum_buffers(
    reference: ReferenceFile, expected: Mapping[str, tuple], keys: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The optimizer state's momentum buffer of each parameter, by reference key, and the
    optimizer's settings (its first parameter group without ``params``).

    torch's ``Optimizer.state_dict`` numbers the parameters 0, 1, ... through its groups in
    the order they were given (``model.parameters()`` for the reference), keeps
    ``{"momentum_buffer": tensor}`` per number under ``state`` (none for a parameter that
    never stepped: zero here). Raises :class:`ConversionError` for anything else.
    """
    state = reference.optimizer_state
    where = f"{reference.path}: entry 0 (the optimizer's state_dict)"
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        raise ConversionError(f"{where} is not a torch optimizer state (no param_groups)")
    groups = state["param_groups"]
    numbers = [n for group in groups if isinstance(group, Mapping) for n in group.get("params", [])]
    if numbers != list(range(len(keys))):
        raise ConversionError(
            f"{where}: its groups hold parameters {_abbreviate(numbers)}, the model state "
            f"{len(keys)} parameters 0..{len(keys) - 1}; use --momentum=zero to leave it out"
        )
    settings = {k: v for k, v in groups[0].items() if k != "params"}
    if len(groups) > 1:
        settings["groups"] = len(groups)
    if any(float(group.get("dampening", 0.0)) != 0.0 for group in groups):
        raise ConversionError(
            f"{where}: dampening {groups[0].get('dampening')}: its buffers are not the "
            "momentum trace gdreg keeps; use --momentum=zero"
        )
    per_number = state.get("state") or {}
    buffers = {}
    for number, key in enumerate(keys):
        entry = per_number.get(number, per_number.get(str(number))) or {}
        value = entry.get("momentum_buffer") if isinstance(entry, Mapping) else None
        shape = expected[key][1]
        if value is None:
            value = np.zeros(shape, np.float32)
        elif np.shape(value) != shape:
            raise ConversionError(
                f"{where}: momentum buffer {number} ({key}) has shape {np.shape(value)}, the "
                f"parameter {shape}"
            )
        buffers[key] = value
    return buffers, settings


def _abbreviate(numbers: list) -> str:
    if len(numbers) <= 6:
        return str(numbers)
    return f"[{numbers[0]}, {numbers[1]}, ..., {numbers[-1]}] ({len(numbers)} entries)"


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A checkpoint read and mapped: the state to write and the record of what was done."""

    config: ml_collections.ConfigDict
    state: experiment.TrainState
    record: dict[str, Any]
    warnings: list[str]


def convert(
    reference: ReferenceFile,
    config: ml_collections.ConfigDict,
    *,
    epoch: int | None = None,
    momentum: str = "file",
) -> Conversion:
    """The gdreg training state of ``reference`` under ``config``, checked in full.

    ``epoch``: the epoch the checkpoint is written at (default: the file's step, else
    :data:`DEFAULT_EPOCH`). ``momentum``: ``"file"`` imports the optimizer's momentum buffers
    (zero where the file has no optimizer state, with a warning), ``"zero"`` starts them at zero.
    Raises :class:`ConversionError` or :class:`gdreg.program.config.ConfigError`.
    """
    if momentum not in ("file", "zero"):
        raise ValueError(f"momentum must be 'file' or 'zero', got {momentum!r}")
    check_config(config)
    model_name = config.model.name
    warnings: list[str] = []
    classes, channels = declared_shape(
        config.data.name,
        synthetic_shape=tuple(config.data.synthetic_shape),
        synthetic_num_classes=config.data.synthetic_num_classes,
    )
    found = reference_names.architecture(reference.model_state) or {}
    if classes is None:
        classes = found.get("classes") or 10
    model = experiment.make_model(config, classes)
    if not isinstance(model, ResNet):
        raise ConfigError(
            f"model.name: the reference's checkpoints hold ResNets; {model_name!r} is not one"
        )
    shapes = _variables_shapes(model, channels or 3)
    where = f"{reference.path} (as gdreg's {model_name} at width {config.model.width}, {classes} classes)"
    try:
        variables = reference_names.import_state_dict(reference.model_state, model, shapes)
    except reference_names.StateDictError as error:
        raise ConversionError(f"{where}: {error}") from None
    expected = reference_names.expected_keys(shapes, model.shortcut)
    keys = reference_names.parameter_order(expected)
    params = variables["params"]
    model_state = {"batch_stats": variables["batch_stats"]}

    if epoch is None:
        epoch = reference.step if reference.step is not None else DEFAULT_EPOCH
    if epoch < 0:
        raise ConversionError(f"--epoch must be at least 0, got {epoch}")
    plan = epoch_plan(config, 1, 1)  # full batch: one step per epoch, whatever the data
    steps = plan.first_step(epoch)
    optimizer = experiment.make_optimizer(config, plan, classes)
    opt_state = jax.tree.map(np.asarray, optimizer.tx.init(params))
    opt_state = _set_counts(opt_state, steps)
    penalty_state = _set_counts(jax.tree.map(np.asarray, optimizer.penalty.init(params)), steps)

    file_settings: dict[str, Any] = {}
    momentum_note = "zero (--momentum=zero)"
    try:
        has_trace = optax.tree_utils.tree_get(opt_state, "trace") is not None
    except KeyError:  # more than one trace: which one would hold torch's buffer is unclear
        has_trace = False
    if momentum == "file" and reference.optimizer_state is None:
        momentum_note = "zero (the file holds no optimizer state)"
        warnings.append(f"{reference.path} holds no optimizer state: the momentum starts at zero")
    elif momentum == "file":
        buffers, file_settings = momentum_buffers(reference, expected, keys)
        if has_trace:
            try:
                trace = reference_names.import_parameter_tensors(buffers, expected)
            except reference_names.StateDictError as error:
                raise ConversionError(f"{where}: momentum buffer of {error}") from None
            opt_state = optax.tree_utils.tree_set(opt_state, trace=trace)
            momentum_note = f"from the file's optimizer state ({len(buffers)} buffers)"
        else:
            momentum_note = "not imported: the config's optimizer keeps no momentum trace"
            warnings.append(
                f"optim.name {config.optim.name!r} with momentum {config.optim.momentum} keeps no "
                "momentum trace: the file's momentum buffers are left out"
            )
        warnings += _compare_settings(file_settings, config, optimizer.schedule, steps)

    state = experiment.TrainState(
        epoch=np.asarray(epoch, np.int32),
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        penalty_state=penalty_state,
        ema=experiment.initial_ema(config, params, model_state),
    )
    ignored = {
        key: np.asarray(value).tolist()
        for key, value in reference.model_state.items()
        if reference_names.is_ignored(key)
    }
    record = {
        "file": os.path.abspath(reference.path),
        "sha256": _sha256(reference.path),
        "layout": "checkpoint list (" + ", ".join(TUPLE_FIELDS) + ")"
        if reference.layout == "tuple"
        else "state_dict",
        "file_step": reference.step,
        "epoch": epoch,
        "model": model_name,
        "width": config.model.width,
        "classes": classes,
        "row": config.row,
        "row_title": ROW_TITLES.get(config.row, config.row),
        "published": published_entry(reference.path)[1] is not None,
        "tensors": len(reference.model_state),
        "parameters": len(keys),
        "batchnorm_statistics": sum(1 for path, _ in expected.values() if path[0] == "batch_stats"),
        "ignored": {
            "num_batches_tracked": ignored,
            "why": "gdreg keeps no BatchNorm pass counter (PyTorch reads it only with momentum=None)",
        },
        "momentum": momentum_note,
        "file_optimizer": _plain(file_settings),
        "scheduler": "not imported: gdreg's learning rate is a function of the step count "
        f"({steps}), the schedule's lr at this epoch is {float(optimizer.schedule(steps)):.6g}",
        "warnings": warnings,
    }
    return Conversion(config, state, record, warnings)


def _compare_settings(
    settings: Mapping[str, Any], config: ml_collections.ConfigDict, schedule, steps: int
) -> list[str]:
    """Warnings where the file's optimizer trained otherwise than ``config`` says."""
    pairs = (
        ("initial_lr", "optim.lr", config.optim.lr),
        ("momentum", "optim.momentum", config.optim.momentum),
        ("nesterov", "optim.nesterov", config.optim.nesterov),
        ("weight_decay", "optim.weight_decay", config.optim.weight_decay),
    )
    warnings = []
    for name, field, value in pairs:
        if name in settings and not _close(settings[name], value):
            warnings.append(
                f"the file's optimizer has {name} {settings[name]!r}, the config {field} "
                f"{value!r} (another row? --config.{field}={settings[name]!r} sets it)"
            )
    if "lr" in settings:
        ours = float(schedule(steps))
        if not _close(settings["lr"], ours, rtol=1e-4):
            warnings.append(
                f"the file's next learning rate is {float(settings['lr']):.6g}, the config's "
                f"schedule gives {ours:.6g} at step {steps} (another row or --epoch?)"
            )
    return warnings


def _close(a: Any, b: Any, rtol: float = 1e-9) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-12)
    except (TypeError, ValueError):
        return a == b


def _plain(value: Any) -> Any:
    """JSON-ready: numpy values as Python ones."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----- writing --------------------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
    """The run directory is new (or an empty folder): the converter never writes over a run."""
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise ConversionError(
            f"{workdir} exists and is not an empty folder; the converter writes a new run "
            "directory: choose another --workdir"
        )


def write_run(conversion: Conversion, workdir: str) -> None:
    """Writes ``config.json``, the checkpoint and ``converted_from.json`` to ``workdir``:
    into a hidden sibling folder first, renamed to ``workdir`` once all is written."""
    check_workdir(workdir)
    workdir = os.path.abspath(workdir)
    parent = os.path.dirname(workdir)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(workdir)}.converting-", dir=parent)
    try:
        rundir.write_config(partial, conversion.config)
        manager = checkpoint.checkpoint_manager(partial, conversion.config.checkpoint.keep)
        try:
            state = replicate(conversion.state, data_mesh())
            checkpoint.save(manager, int(conversion.state.epoch), state)
        finally:
            manager.close()
        rundir.write_conversion_record(partial, _plain(conversion.record))
        if os.path.isdir(workdir):
            os.rmdir(workdir)  # empty (check_workdir)
        os.rename(partial, workdir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# ----- the program ----------------------------------------------------------------------------


def _define_flags() -> None:
    """The command's flags, defined when it runs (not on import: :func:`convert` is a library
    function, and other gdreg commands define ``--config`` too)."""
    if "momentum" in FLAGS:
        return
    flags.DEFINE_string("workdir", None, "The run directory to write (new or empty).")
    flags.DEFINE_string(
        "model", None, "gdreg's model (resnet18, resnet152, ...); default: from a published name."
    )
    flags.DEFINE_string(
        "row",
        None,
        f"The paper row the run trained with ({', '.join(PAPER_TABLE)}); default: "
        "from a published name.",
    )
    config_flags.DEFINE_config_file(
        "config", None, "Instead of --row/--model: a training config file.", lock_config=True
    )
    flags.DEFINE_integer(
        "epoch", None, f"The checkpoint's epoch; default: the file's step, else {DEFAULT_EPOCH}."
    )
    flags.DEFINE_enum(
        "momentum",
        "file",
        ["file", "zero"],
        "Momentum buffers from the file's optimizer state, or zero.",
    )


def _run(argv: list[str]) -> int:
    if len(argv) != 2:
        given = " ".join(argv[1:]) or "none"
        print(f"error: give one checkpoint FILE.pth (got {given})", file=sys.stderr)
        return exitcodes.BAD_INPUT
    path = argv[1]
    if FLAGS.workdir is None:
        print("error: --workdir is required (the run directory to write)", file=sys.stderr)
        return exitcodes.BAD_INPUT
    # Orbax's lines per checkpoint (through absl) and JAX's backend probing: the output is
    # the summary, warnings and errors.
    for name in ("absl", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        check_workdir(FLAGS.workdir)
        reference = read_reference_file(path)
        if FLAGS.config is not None:
            if FLAGS.row or FLAGS.model:
                raise ConversionError("--row and --model go without --config (it names both)")
            config = FLAGS.config.copy_and_resolve_references()
        else:
            config = default_config(path, FLAGS.model, FLAGS.row)
        conversion = convert(reference, config, epoch=FLAGS.epoch, momentum=FLAGS.momentum)
        write_run(conversion, FLAGS.workdir)
    except (ConversionError, ConfigError, rundir.RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    for warning in conversion.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    record = conversion.record
    print(
        f"converted {path}: {record['model']} ({record['row_title']}), epoch {record['epoch']}, "
        f"{record['parameters']} parameter tensors and {record['batchnorm_statistics']} "
        f"BatchNorm statistics ({len(record['ignored']['num_batches_tracked'])} "
        f"num_batches_tracked left out), momentum {record['momentum']} -> {FLAGS.workdir}"
    )
    print(f"test accuracy: python -m gdreg.tools.evaluate --workdir {FLAGS.workdir}")
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-convert-reference``."""
    _define_flags()
    app.run(lambda argv: sys.exit(_run(argv)), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
