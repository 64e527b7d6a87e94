"""The configuration: its schema, its validation, and the paper's table rows.

Units: an *epoch* is one pass over the training set; in full-batch mode one optimizer step
is one epoch, so ``train.epochs`` is the number of full-batch steps and every schedule length
is counted in epochs in both modes. Hyperparameters: Geiping, Goldblum, Pope, Moeller and
Goldstein, "Stochastic Training is Not Necessary for Generalization" (ICLR 2022, arXiv
2109.14119), Tables 1-2 and Sec. 4.3, and the authors' configuration files (github.com/
JonasGeiping/fullbatchtraining, ``config/hyp/``).

This is the only module that names config fields in error messages: :func:`validate` checks
every field before anything is built, and :func:`blame` turns a library's complaint about
one of its arguments (which the libraries name after the config field's leaf, e.g.
``npz_path``) into a :class:`ConfigError` naming the field (``data.npz_path``). The module
imports no JAX: the choices it checks are declared by their owners' packages without JAX
(:data:`gdreg.engine.MICROBATCH_LOOPS`, :data:`gdreg.optim.SCHEDULES`, ...); the model's name
and dtype belong to the model registry and are checked with the rest by
:func:`gdreg.program.experiment.validate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from gdreg.data import AUGMENTATIONS, DATASET_NAMES
from gdreg.engine import BATCHNORM_RULES, BLOCK_LOOPS, MICROBATCH_LOOPS
from gdreg.optim import CLIP_NORM_TYPES, LINE_SEARCHES, MODIFICATIONS, OPTIMIZERS, SCHEDULES
from gdreg.penalty import METHODS

#: ``train.mode``.
MODES = ("fullbatch", "stochastic")
#: ``train.autotune`` (:mod:`gdreg.program.autotune`).
AUTOTUNE_MODES = ("auto", "on", "off")
#: The largest ``seed``: JAX's keys take 32 bits without 64-bit mode (a larger seed would be
#: cut to its low bits, and 2**32 would repeat seed 0), and the augmentation uses seed + 1.
MAX_SEED = 2**32 - 2
#: The largest ``train.epochs``: the learning rate is a table of one float per epoch, built
#: in Python before training (10**6 epochs: 8 MB and a few seconds).
MAX_EPOCHS = 10**6
#: The most optimizer steps of a run: the step counters are int32.
MAX_STEPS = 2**31 - 1


class ConfigError(ValueError):
    """A config field has a value the program cannot run with; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, set to the paper's "FB regularized" ResNet-18 run."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.row = ""  # the table row this config reproduces (a key of PAPER_TABLE), for reports

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"  # see gdreg.models.model_names()
    config.model.width = 64  # channels of the first stage (DenseNet: growth rate 32 in the paper)
    config.model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"  # cifar10 | cifar100 | npz | synthetic | digits
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    config.data.download = True  # TFDS: download and prepare the dataset if it is missing
    config.data.npz_path = ""  # npz: file with x_train, y_train, x_test, y_test
    config.data.train_size = 0  # 0: the whole training split; else a class-stratified subset
    config.data.test_size = 0
    config.data.augmentation = "random"  # random (fresh every step) | fixed | none
    config.data.copies = 1  # fixed: N x augmented copies, drawn once
    config.data.padding = 4  # zero padding before the random crop
    config.data.flip = True  # random horizontal flips
    config.data.synthetic_shape = (32, 32, 3)
    config.data.synthetic_num_classes = 10
    config.data.synthetic_train_size = 512
    config.data.synthetic_test_size = 256

    config.train = ml_collections.ConfigDict()
    config.train.mode = "fullbatch"  # fullbatch | stochastic
    config.train.epochs = 3000  # full-batch steps (one step = one epoch)
    config.train.block_size = 128  # full batch: images per block (regularizer and BatchNorm)
    config.train.batch_size = 128  # stochastic: minibatch size
    config.train.shuffle_blocks = False  # full batch: redraw the block assignment every step
    # The reference's sanity checks around the SGD baseline (gdreg.program.epochs): train the first
    # K epochs in train.mode and the rest in the other mode (0: never switch); stochastic
    # epochs drawing their images with replacement; stochastic epoch e on augmented copy
    # e mod data.copies only (data.augmentation="fixed").
    config.train.switch_mode_after = 0
    config.train.sample_with_replacement = False
    config.train.semi_stochastic = False
    # Stop once the last K epochs all reached 100% training accuracy (0: never), as the
    # reference's stop_at_full_training_accuracy.
    config.train.stop_at_full_accuracy = 0
    # The engine's loop shape (speed only; gdreg.program.autotune). Left at 0 / "", a knob is timed
    # per train.autotune or takes the backend default (1 block per call on CPU, 4 on GPU;
    # python; unroll).
    config.train.blocks_per_microbatch = 0  # blocks per compiled call; 0: tuned or default
    config.train.microbatch_loop = ""  # python | scan; "": tuned or default
    config.train.block_loop = ""  # unroll | vmap; "": tuned or default
    # Time the loop shapes not set above before training (stored in WORKDIR/loop_shape.json
    # and reused on resume): auto (on GPU/TPU; CPU takes the defaults) | on | off (defaults).
    config.train.autotune = "auto"
    config.train.autotune_seconds = 30.0  # no new candidate is timed after this many seconds
    config.train.cpu_devices = 0  # CPU backend: devices to split the host into; 0: auto
    # How the BatchNorm statistics of a step's forward passes become the running statistics
    # that evaluation uses (gdreg.engine.running_statistics): reference (the reference
    # implementation's sequential update over every train-mode pass, the penalty's perturbed passes
    # included) | mean (one momentum step with the mean block statistics, order-free) | recompute
    # (the statistics of the whole training set at the current weights, before each evaluation).
    config.train.batchnorm_statistics = "reference"

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 0.8
    # warmup_cosine | warmup_constant | warmup_linear | warmup_step | warmup_exponential
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = 400
    config.optim.cosine_epochs = 4000  # cosine (and linear) horizon, from the end of warmup
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-4
    config.optim.clip_norm = 0.25  # global L2 norm of the mean gradient; 0 turns clipping off
    # The optimizers and options of the reference implementation (gdreg.optim.chain.optimizer_chain;
    # docs/options.md, "Optimizer, schedule and loss options", says what each computes).
    config.optim.name = "sgd"  # sgd | adam | adamw | gd_agc
    config.optim.modification = "none"  # none | lars | larc | sam
    config.optim.clip_norm_type = "2"  # norm of clip_norm and batch_clip: 2 | inf
    config.optim.batch_clip = 0.0  # clip every block's (penalized) gradient to this norm; 0: off
    config.optim.weight_decay_linear_only = False  # decay only kernels (>= 2-D parameters)
    config.optim.adam_b1 = 0.9  # adam, adamw
    config.optim.adam_b2 = 0.999
    config.optim.adam_eps = 1e-8
    config.optim.agc_clipping = 0.01  # gd_agc: unit-wise gradient norm <= this * param norm
    config.optim.agc_eps = 1e-3  # gd_agc: smallest parameter norm in that bound
    config.optim.trust_coefficient = 0.02  # lars, larc
    config.optim.trust_eps = 1e-8  # lars, larc
    config.optim.sam_rho = 0.05  # sam: radius of the ascent step
    config.optim.grad_noise_additive = 0.0  # std of N(0, 1) noise added to the mean gradient
    config.optim.grad_noise_multiplicative = 0.0  # std of the noise z in g * (1 + z)
    config.optim.line_search = "none"  # none | armijo (backtracking along the update)
    config.optim.line_search_slope = 1e-4  # armijo: sufficient-decrease coefficient c
    config.optim.line_search_decrease = 0.5  # armijo: factor per rejected step
    config.optim.line_search_steps = 25  # armijo: most rejected steps
    # Schedules (optim.schedule): the milestones of warmup_step in epochs after the warmup
    # (empty: the reference's "linear" ones, 3/8, 5/8 and 7/8 of train.epochs) and its factor;
    # warmup_exponential's factor per epoch; the floor of warmup_cosine and warmup_linear as
    # a fraction of lr (the reference's cosine-decay-floored: 0.04).
    config.optim.milestones = ()
    config.optim.step_gamma = 0.1
    config.optim.exponential_gamma = 0.99
    config.optim.cosine_floor = 0.0

    config.penalty = ml_collections.ConfigDict()
    config.penalty.strength = 0.5  # weight of the block gradient; 0 turns the regularizer off
    config.penalty.method = "forward"  # forward | central | jvp
    config.penalty.eps = 1e-2
    # Weight of the full-batch gradient in the penalty's Hessian-vector product (the
    # reference's acc_strength; 0 in the paper). Above 0 every step makes a second pass.
    config.penalty.full_strength = 0.0

    # The training loss (gdreg.program.experiment.make_loss_fn) and terms added to its gradient.
    config.loss = ml_collections.ConfigDict()
    config.loss.label_smoothing = 0.0  # weight s: 1 - s on the label, s / (K - 1) elsewhere
    # Norm bias (Goldblum et al. 2020) towards ||theta|| = norm_bias_target: the gradient of
    # norm_bias * |d| (norm_bias_norm 1) or norm_bias / 2 * d^2 (2), d = ||theta||^2 - target^2,
    # added to the full mean gradient before clipping. 0 turns it off.
    config.loss.norm_bias = 0.0
    config.loss.norm_bias_norm = 1
    config.loss.norm_bias_target = 0.0

    config.eval = ml_collections.ConfigDict()
    config.eval.every_epochs = 100  # 0: only at the end
    config.eval.batch_size = 1000
    config.eval.flip_average = False  # test-time augmentation: mean of image and mirror image
    # Also evaluate an exponential moving average of the weights and BatchNorm statistics,
    # updated once per epoch: ema <- m * ema + (1 - m) * current (the reference's evaluate_ema)
    config.eval.ema = False
    config.eval.ema_momentum = 0.99

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_epochs = 50  # 0: only at the end (and on SIGTERM)
    config.checkpoint.keep = 3
    # On resume, when no checkpoint is intact (they are moved to WORKDIR/damaged_checkpoints):
    # False ends with an error, True starts the run again from epoch 0.
    config.checkpoint.restart_if_damaged = False

    # Analysis metrics (gdreg.program.analysis) in metrics.jsonl: norms, the spread of the block
    # gradients and the gradient noise scale, and optionally the reference's flatness probe.
    config.analysis = ml_collections.ConfigDict()
    config.analysis.every_epochs = 0  # 0: off; else every N epochs and at the end
    # Flatness: steps of flatness_step_size along a filter-normalized random direction until
    # the evaluation-mode training loss exceeds flatness_threshold (at most flatness_max_steps
    # steps, each a forward pass over the training set).
    config.analysis.flatness = False
    config.analysis.flatness_step_size = 0.1
    config.analysis.flatness_threshold = 1.0
    config.analysis.flatness_max_steps = 100

    config.log = ml_collections.ConfigDict()
    config.log.progress = True  # progress bar on the console
    config.log.tensorboard = True  # WORKDIR/tensorboard event files (gdreg.program.summaries)
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


# ----- the paper's rows -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's tables: its title and the fields it sets (dotted names)."""

    title: str
    settings: Mapping[str, Any]


_SGD = {
    "train.mode": "stochastic",
    "train.batch_size": 128,
    "train.epochs": 300,
    "optim.lr": 0.1,
    "optim.warmup_epochs": 5,
    "optim.cosine_epochs": 300,  # the reference's cosine decay over all 300 epochs
    "optim.clip_norm": 0.0,
    "penalty.strength": 0.0,
    "eval.every_epochs": 10,
    "checkpoint.every_epochs": 10,
}
_FB_LONGER = {
    "train.mode": "fullbatch",
    "train.epochs": 3000,
    "train.block_size": 128,
    "optim.lr": 0.4,
    "optim.warmup_epochs": 400,
    "optim.cosine_epochs": 4000,
    "optim.clip_norm": 0.0,
    "penalty.strength": 0.0,
}
_FB_CLIPPED = {**_FB_LONGER, "optim.clip_norm": 0.25}
_FB_REGULARIZED = {**_FB_CLIPPED, "optim.lr": 0.8, "penalty.strength": 0.5}
_FB_STRONG = {**_FB_REGULARIZED, "train.block_size": 32}
_NO_AUGMENTATION = {"data.augmentation": "none"}
_TEN_COPIES = {"data.augmentation": "fixed", "data.copies": 10}

#: Table 1 of the paper (ResNet-18; Table 2 repeats it for ResNet-50, ResNet-152 and
#: DenseNet-121), then the fixed-dataset experiments of Sec. 4.3 (no augmentation; N x CIFAR
#: with N = data.copies). A row sets only the fields it lists.
PAPER_TABLE: dict[str, PaperRow] = {
    "sgd": PaperRow("Baseline SGD", _SGD),
    "fb_baseline": PaperRow("Baseline FB", {**_SGD, "train.mode": "fullbatch"}),
    "longer": PaperRow("FB train longer", _FB_LONGER),
    "clipped": PaperRow("FB clipped", _FB_CLIPPED),
    "regularized": PaperRow("FB regularized", _FB_REGULARIZED),
    "strong": PaperRow("FB strong reg.", _FB_STRONG),
    "practice": PaperRow("FB in practice", {**_FB_STRONG, "train.shuffle_blocks": True}),
    "sgd_noaug": PaperRow("SGD, no augmentation", {**_SGD, **_NO_AUGMENTATION}),
    "strong_noaug": PaperRow("FB strong reg., no augmentation", {**_FB_STRONG, **_NO_AUGMENTATION}),
    "sgd_copies": PaperRow("SGD, N x CIFAR", {**_SGD, **_TEN_COPIES}),
    "fb_copies": PaperRow("FB, N x CIFAR", {**_FB_LONGER, **_TEN_COPIES}),
    "strong_copies": PaperRow("FB strong reg., N x CIFAR", {**_FB_STRONG, **_TEN_COPIES}),
}
PAPER_ROWS = ("sgd", "fb_baseline", "longer", "clipped", "regularized", "strong", "practice")
FIXED_DATA_ROWS = tuple(row for row in PAPER_TABLE if row not in PAPER_ROWS)
ROW_TITLES = {row: entry.title for row, entry in PAPER_TABLE.items()}
#: The models of the paper's Tables 1 and 2 and their widths (``model.width``: channels of the
#: first stage; DenseNet: growth rate).
PAPER_WIDTHS = {"resnet18": 64, "resnet50": 64, "resnet152": 64, "densenet121": 32}
PAPER_MODELS = tuple(PAPER_WIDTHS)


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """``set_field(config, "optim.lr", 0.4)`` sets ``config.optim.lr``."""
    *sections, leaf = dotted.split(".")
    for section in sections:
        config = config[section]
    config[leaf] = value


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """``get_field(config, "optim.lr")`` is ``config.optim.lr``."""
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def apply_row(config: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
    """Sets the fields of one row of :data:`PAPER_TABLE` in ``config`` (and ``config.row``).

    Baseline SGD: batch 128, 300 epochs, lr 0.1, 5 warmup epochs, cosine to 0. Baseline FB: the
    same, full batch. The 3000-step rows: lr 0.4 (0.8 with the penalty), 400 warmup steps,
    cosine horizon 4000 from the end of warmup, clipping at 0.25 ("clipped" onwards), penalty
    strength 0.5 with blocks of 128 ("regularized") or 32 ("strong", "practice"), blocks
    redrawn every step ("practice").
    """
    if row not in PAPER_TABLE:
        raise ConfigError(f"unknown row {row!r}; known: {tuple(PAPER_TABLE)}")
    config.row = row
    for dotted, value in PAPER_TABLE[row].settings.items():
        set_field(config, dotted, value)
    return config


def paper_config(model: str, row: str, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The config of one table row for ``model`` on ``dataset``."""
    config = base_config()
    config.model.name = model
    config.model.width = PAPER_WIDTHS.get(model, config.model.width)
    config.data.name = dataset
    return apply_row(config, row)


#: How reports and plots name a dataset (``data.name``).
DATA_TITLES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "digits": "8x8 digits",
    "synthetic": "synthetic",
    "npz": "npz",
}


def data_title(flat: Mapping[str, Any], *, subset: bool = True) -> str:
    """The training data of a flattened config (:func:`flatten`) in a few words: ``CIFAR-10``,
    ``CIFAR-10, 1,024-image subset``, ``synthetic 8x8x3, 128 images``, ``npz train.npz``.
    ``subset=False`` names the dataset alone (a subset of CIFAR-10 is CIFAR-10), whose test set
    every run of it is evaluated on."""
    name = str(flat.get("data.name", ""))
    title = DATA_TITLES.get(name, name)
    size = int(flat.get("data.train_size") or 0) if subset else 0
    if name == "synthetic":
        shape = "x".join(str(int(side)) for side in flat.get("data.synthetic_shape", ()))
        images = int(flat.get("data.synthetic_train_size") or 0)
        images = min(images, size) if size else images
        return f"{title} {shape}, {images:,} images"
    if name == "npz":
        title = f"npz {str(flat.get('data.npz_path', '')).rstrip('/').split('/')[-1]}"
    return f"{title}, {size:,}-image subset" if size else title


def model_title(flat: Mapping[str, Any]) -> str:
    """The model of a flattened config: its registry name, with its width when that is not
    the paper's (:data:`PAPER_WIDTHS`), e.g. ``resnet18`` or ``convnet2 (width 16)``."""
    name = str(flat.get("model.name", ""))
    width = flat.get("model.width")
    if width is None or PAPER_WIDTHS.get(name.strip().lower()) == width:
        return name
    return f"{name} (width {int(width)})"


# ----- validation -------------------------------------------------------------------------------


def _choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the fields that name a choice, as their owners declare them."""
    return {
        "data.name": DATASET_NAMES,
        "data.augmentation": AUGMENTATIONS,
        "train.mode": MODES,
        "train.microbatch_loop": ("", *MICROBATCH_LOOPS),  # "": the backend's default
        "train.block_loop": ("", *BLOCK_LOOPS),
        "train.autotune": AUTOTUNE_MODES,
        "train.batchnorm_statistics": BATCHNORM_RULES,
        "optim.schedule": SCHEDULES,
        "optim.name": OPTIMIZERS,
        "optim.modification": MODIFICATIONS,
        "optim.clip_norm_type": tuple(CLIP_NORM_TYPES),
        "optim.line_search": LINE_SEARCHES,
        "loss.norm_bias_norm": (1, 2),
        "penalty.method": METHODS,
    }


def _bounds(config: ml_collections.ConfigDict) -> list[tuple[bool, str, str]]:
    """(holds, field, what it must be) for every numeric field."""
    data, train, optim, loss = config.data, config.train, config.optim, config.loss
    return [
        (
            0 <= config.seed <= MAX_SEED,
            "seed",
            f"must be in 0..{MAX_SEED} (JAX's random keys hold 32 bits, and the augmentation "
            "draws from seed + 1)",
        ),
        (config.model.width >= 1, "model.width", "must be a positive number of channels"),
        (data.train_size >= 0, "data.train_size", "must be >= 0 (0: all)"),
        (data.test_size >= 0, "data.test_size", "must be >= 0 (0: all)"),
        (data.copies >= 1, "data.copies", "must be >= 1"),
        (data.padding >= 0, "data.padding", "must be >= 0"),
        (
            len(data.synthetic_shape) == 3 and min(data.synthetic_shape) >= 1,
            "data.synthetic_shape",
            "must be three positive sizes (H, W, C)",
        ),
        (data.synthetic_num_classes >= 1, "data.synthetic_num_classes", "must be >= 1"),
        (data.synthetic_train_size >= 1, "data.synthetic_train_size", "must be >= 1"),
        (data.synthetic_test_size >= 0, "data.synthetic_test_size", "must be >= 0"),
        (
            1 <= train.epochs <= MAX_EPOCHS,
            "train.epochs",
            f"must be in 1..{MAX_EPOCHS} (the schedule is a table of one rate per epoch)",
        ),
        (train.block_size >= 1, "train.block_size", "must be at least 1"),
        (train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (train.blocks_per_microbatch >= 0, "train.blocks_per_microbatch", "must be >= 0"),
        (train.cpu_devices >= 0, "train.cpu_devices", "must be >= 0"),
        (train.autotune_seconds >= 0, "train.autotune_seconds", "must be >= 0"),
        (0 < optim.lr < math.inf, "optim.lr", "must be finite and positive"),
        (optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be non-negative"),
        (
            optim.schedule not in ("warmup_cosine", "warmup_linear") or optim.cosine_epochs > 0,
            "optim.cosine_epochs",
            f"must be positive for the {optim.schedule} schedule",
        ),
        (0 <= optim.momentum < 1, "optim.momentum", "must be in [0, 1)"),
        (0 <= optim.weight_decay < math.inf, "optim.weight_decay", "must be finite and >= 0"),
        (optim.clip_norm >= 0, "optim.clip_norm", "must be non-negative"),
        (optim.batch_clip >= 0, "optim.batch_clip", "must be non-negative"),
        (0 <= optim.adam_b1 < 1, "optim.adam_b1", "must be in [0, 1)"),
        (0 <= optim.adam_b2 < 1, "optim.adam_b2", "must be in [0, 1)"),
        (optim.adam_eps >= 0, "optim.adam_eps", "must be non-negative"),
        (optim.agc_clipping > 0, "optim.agc_clipping", "must be positive"),
        (optim.agc_eps >= 0, "optim.agc_eps", "must be non-negative"),
        (optim.trust_coefficient > 0, "optim.trust_coefficient", "must be positive"),
        (optim.trust_eps >= 0, "optim.trust_eps", "must be non-negative"),
        (optim.sam_rho > 0, "optim.sam_rho", "must be positive"),
        (optim.grad_noise_additive >= 0, "optim.grad_noise_additive", "must be non-negative"),
        (
            optim.grad_noise_multiplicative >= 0,
            "optim.grad_noise_multiplicative",
            "must be non-negative",
        ),
        (0 < optim.line_search_slope < 1, "optim.line_search_slope", "must be in (0, 1)"),
        (0 < optim.line_search_decrease < 1, "optim.line_search_decrease", "must be in (0, 1)"),
        (optim.line_search_steps >= 0, "optim.line_search_steps", "must be >= 0"),
        (
            optim.line_search == "none" or optim.modification != "sam",
            "optim.line_search",
            'cannot be combined with optim.modification="sam"',
        ),
        (
            optim.line_search == "none" or not _has_stochastic(train),
            "optim.line_search",
            "runs on full-batch epochs only, and this run has stochastic ones",
        ),
        (
            all(isinstance(m, int) and m >= 0 for m in optim.milestones),
            "optim.milestones",
            "must be non-negative integers (epochs after the warmup)",
        ),
        (optim.step_gamma > 0, "optim.step_gamma", "must be positive"),
        (optim.exponential_gamma > 0, "optim.exponential_gamma", "must be positive"),
        (0 <= optim.cosine_floor <= 1, "optim.cosine_floor", "must be in [0, 1]"),
        (0 <= loss.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)"),
        (loss.norm_bias >= 0, "loss.norm_bias", "must be non-negative"),
        (loss.norm_bias_target >= 0, "loss.norm_bias_target", "must be non-negative"),
        (config.penalty.strength >= 0, "penalty.strength", "must be non-negative"),
        (config.penalty.full_strength >= 0, "penalty.full_strength", "must be non-negative"),
        (config.penalty.eps > 0, "penalty.eps", "must be positive"),
        (train.switch_mode_after >= 0, "train.switch_mode_after", "must be >= 0 (0: never)"),
        (train.stop_at_full_accuracy >= 0, "train.stop_at_full_accuracy", "must be >= 0"),
        (
            not train.semi_stochastic or data.augmentation == "fixed",
            "train.semi_stochastic",
            'needs data.augmentation="fixed" (its copies are what the epochs cycle through)',
        ),
        (
            not (train.semi_stochastic or train.sample_with_replacement) or _has_stochastic(train),
            "train.semi_stochastic" if train.semi_stochastic else "train.sample_with_replacement",
            "applies to stochastic epochs, and this run has none",
        ),
        (0 <= config.eval.ema_momentum < 1, "eval.ema_momentum", "must be in [0, 1)"),
        (config.eval.every_epochs >= 0, "eval.every_epochs", "must be non-negative"),
        (config.eval.batch_size >= 1, "eval.batch_size", "must be at least 1"),
        (config.checkpoint.every_epochs >= 0, "checkpoint.every_epochs", "must be >= 0"),
        (config.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1"),
        (config.analysis.every_epochs >= 0, "analysis.every_epochs", "must be >= 0 (0: off)"),
        (
            config.analysis.flatness_step_size > 0,
            "analysis.flatness_step_size",
            "must be positive",
        ),
        (
            config.analysis.flatness_threshold > 0,
            "analysis.flatness_threshold",
            "must be positive (a cross-entropy)",
        ),
        (config.analysis.flatness_max_steps >= 1, "analysis.flatness_max_steps", "must be >= 1"),
    ]


def _has_stochastic(train: ml_collections.ConfigDict) -> bool:
    return train.mode == "stochastic" or train.switch_mode_after > 0


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field of ``config``; raises :class:`ConfigError` naming the first bad one.

    What depends on the dataset (a block larger than the training set, an unreadable ``.npz``)
    is checked when the data is loaded: see :func:`check_dataset_fits` and :func:`blame`.
    """
    for field, allowed in _choices().items():
        value = get_field(config, field)
        if value not in allowed:
            raise ConfigError(f"{field}={value!r} is not known; choose one of {allowed}")
    if config.data.name == "npz" and not config.data.npz_path:
        raise ConfigError("data.npz_path must be set when data.name='npz'")
    for holds, field, message in _bounds(config):
        if not holds:
            raise ConfigError(f"{field} {message}, got {get_field(config, field)!r}")
    for field, value in flatten(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field} must be a finite number, got {value!r}")


#: Fields that change how a run executes or is logged, never what it computes. They may
#: change when a run resumes, and runs that differ only in them are seeds of one table row.
RUNTIME_FIELDS = (
    "data.data_dir",
    "data.download",
    "train.blocks_per_microbatch",
    "train.microbatch_loop",
    "train.block_loop",
    "train.autotune",
    "train.autotune_seconds",
    "train.cpu_devices",
    "eval.every_epochs",
    "eval.batch_size",
    "checkpoint",
    "log",
    "analysis",  # measures the state, changes nothing
)
#: Fields that decide the shapes of the checkpointed state: a resumed run cannot change them.
STATE_FIELDS = (
    "model.name",
    "model.width",
    "eval.ema",
    "data.name",
    "data.synthetic_shape",
    "data.synthetic_num_classes",
    "optim.name",
    "optim.modification",
    "optim.weight_decay_linear_only",
)
#: Optimizer fields whose switching on or off (0 <-> positive) changes the optimizer's state
#: (or, for optim.batch_clip, the per-block penalty's).
STATE_SWITCHES = (
    "optim.momentum",
    "optim.clip_norm",
    "optim.weight_decay",
    "optim.batch_clip",
    "optim.grad_noise_additive",
    "optim.grad_noise_multiplicative",
    "loss.norm_bias",
)


def in_fields(field: str, fields: tuple[str, ...]) -> bool:
    """Whether ``field`` is one of ``fields`` or lies in one of them (a section)."""
    return any(field == name or field.startswith(name + ".") for name in fields)


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``{field: (old, new)}`` as ``field old -> new; ...`` for messages and logs."""
    return "; ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in changes.items())


def resume_changes(
    saved: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    *,
    allow: bool,
    source: str = "the run's config.json",
) -> dict[str, tuple[Any, Any]]:
    """The fields a resumed run changes, ``{field: (saved value, new value)}``; ``source``
    names where ``saved`` was read, for the messages.

    Raises :class:`ConfigError` for a change to a field of :data:`STATE_FIELDS` or the switching
    of a :data:`STATE_SWITCHES` field (always), and for any other change outside
    :data:`RUNTIME_FIELDS` and ``train.epochs`` (training longer or shorter) unless ``allow``
    (``gdreg.main --allow_config_change``).
    """
    old, new = flatten(saved), flatten(config)
    changed = {
        field: (old.get(field), new.get(field))
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field) and not in_fields(field, RUNTIME_FIELDS)
    }

    def describe(fields):
        return describe_changes({field: changed[field] for field in fields})

    refused = [field for field in changed if in_fields(field, STATE_FIELDS)]
    refused += [
        field
        for field in changed
        if field in STATE_SWITCHES and (changed[field][0] > 0) != (changed[field][1] > 0)
    ]
    if refused:
        raise ConfigError(
            f"cannot resume with another {', '.join(refused)} ({describe(refused)}): the "
            "checkpoints hold another state; use a new --workdir"
        )
    # Only where the run stops: the steps it took and will take stay the same, unless the
    # schedule is laid out over the run (warmup_step's default milestones).
    needs_permission = [
        field
        for field in changed
        if field != "train.epochs"
        or schedule_follows_epochs(saved)
        or schedule_follows_epochs(config)
    ]
    if needs_permission and not allow:
        raise ConfigError(
            f"the config differs from {source} ({describe(needs_permission)}); pass "
            "--allow_config_change to resume with it (the change is kept in "
            "config_history.jsonl), or use a new --workdir"
        )
    return changed


def schedule_follows_epochs(config: ml_collections.ConfigDict) -> bool:
    """Whether the learning rate of an epoch depends on ``train.epochs``: ``warmup_step``
    with the reference's milestones (``optim.milestones`` empty: 3/8, 5/8 and 7/8 of the run)."""
    return config.optim.schedule == "warmup_step" and not config.optim.milestones


def check_dataset_fits(
    config: ml_collections.ConfigDict, num_virtual_images: int, num_images: int | None = None
) -> None:
    """Checks that a block (or minibatch) fits in the ``num_virtual_images`` training images
    (a semi-stochastic minibatch in the ``num_images`` images of one augmented copy)."""
    fields = ["train.block_size"] if config.train.mode == "fullbatch" else ["train.batch_size"]
    if config.train.switch_mode_after:
        fields = ["train.block_size", "train.batch_size"]
    for field in fields:
        size = get_field(config, field)
        pool = num_virtual_images
        if field == "train.batch_size" and config.train.semi_stochastic and num_images:
            pool = num_images
        if size > pool:
            raise ConfigError(f"{field} {size} is larger than the {pool} training images")


def check_step_count(config: ml_collections.ConfigDict, steps: int) -> None:
    """Checks that the ``steps`` optimizer steps of the whole run fit the step counter
    (int32 in the optimizer's and the penalty's state)."""
    if steps > MAX_STEPS:
        raise ConfigError(
            f"train.epochs {config.train.epochs} takes {steps} optimizer steps, more than the "
            f"step counter holds ({MAX_STEPS}); train fewer epochs or use larger batches"
        )


def check_devices_fit(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks that a minibatch splits evenly over the devices (stochastic mode, where every
    device takes ``batch_size / num_devices`` images of each minibatch)."""
    size = config.train.batch_size
    if _has_stochastic(config.train) and size % num_devices:
        raise ConfigError(
            f"train.batch_size {size} does not split evenly over the {num_devices} devices; "
            f"use a multiple of {num_devices}"
            + (f" or set {as_flag('train.cpu_devices')}" if _on_cpu() else "")
        )


def _on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def as_flag(dotted: str) -> str:
    """How a field is set on the command line: ``as_flag("data.data_dir")`` is
    ``--config.data.data_dir``."""
    return f"--config.{dotted}"


@contextlib.contextmanager
def blame(section: str) -> Iterator[None]:
    """Re-raises a ``ValueError`` from a library as a :class:`ConfigError` on ``section``.

    The libraries name their arguments after the config fields' leaves, so a message that
    starts with such a name (``npz_path='x.npz': file not found``) is prefixed with the section
    (``data.npz_path='x.npz': file not found``); any other message with ``section: ``.
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        message = " ".join(str(error).split())
        match = re.match(r"[a-z_]+", message)
        if match and match.group(0) in base_config()[section]:
            raise ConfigError(f"{section}.{message}") from None
        raise ConfigError(f"{section}: {message}") from None
