"""The reference implementation's PyTorch ``state_dict`` of a ResNet as gdreg's variables.

The paper authors' ResNet (``fullbatch/models/resnets.py`` in github.com/JonasGeiping/
fullbatchtraining, a modified torchvision ResNet) names its tensors as PyTorch modules do,
by attribute and ``Sequential`` index. gdreg's :class:`gdreg.models.resnet.ResNet` builds the
same network (same layers, same order, same shapes; parameter counts are checked against the
reference in tests/test_model_counts.py) and names them by Flax scope. The map, for a block
``J`` (from 0) of stage ``I`` (from 0)::

    reference key                          gdreg variable                         layout
    stem.0.weight                          params/stem_conv/kernel                OIHW -> HWIO
    stem.1.weight, stem.1.bias             params/stem_bn/scale, .../bias
    stem.1.running_mean, .running_var      batch_stats/stem_bn/mean, .../var
    layers.I.J.convK.weight                params/stage{I+1}_block{J+1}/convK/kernel   OIHW -> HWIO
    layers.I.J.bnK.{weight,bias}           params/stage{I+1}_block{J+1}/bnK/{scale,bias}
    layers.I.J.bnK.running_{mean,var}      batch_stats/stage{I+1}_block{J+1}/bnK/{mean,var}
    layers.I.J.downsample.1.weight         .../shortcut/conv/kernel   (shortcut "C": index 0 is
    layers.I.J.downsample.2.*              .../shortcut/bn/...         the tensorless AvgPool2d)
    layers.I.J.downsample.0.weight         .../shortcut/conv/kernel   (shortcut "B": conv, BN)
    layers.I.J.downsample.1.*              .../shortcut/bn/...
    fc.weight [classes, features]          params/fc/kernel [features, classes]   transposed
    fc.bias                                params/fc/bias
    *.num_batches_tracked                  (none: accepted and ignored, see below)

``K`` is 1, 2 (basic blocks) or 1, 2, 3 (bottlenecks). The BatchNorm statistics keep
PyTorch's convention: ``running_var`` is the running average of the *unbiased* batch
variance, which is what gdreg's ``batch_stats/var`` holds and evaluation divides by
(:class:`gdreg.models.layers.BatchNorm`); eval mode is ``(x - mean) / sqrt(var + 1e-5)`` on
both sides. ``num_batches_tracked`` counts the layer's train-mode passes; PyTorch reads it only
when ``momentum=None`` (a cumulative average), which the reference never sets, and gdreg keeps
no counter (its running statistics are the engine's, :mod:`gdreg.engine.running_statistics`), so
it has no counterpart and is dropped. Nothing else of the reference's ResNet holds a tensor: its
ReLUs and pools have none, and ``zero_init_residual`` only sets the last BatchNorm scale of each
branch at construction (no parameter or buffer of its own).

A PyTorch optimizer numbers its state by position in ``model.parameters()``, the order in
which the reference's modules register their parameters (:func:`parameter_order`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gdreg.models.resnet import CIFAR_RESNET_CONFIGS, RESNET_CONFIGS, Bottleneck, ResNet

#: BatchNorm buffers that gdreg keeps, by their gdreg names.
_BUFFERS = {"mean": "running_mean", "var": "running_var"}
#: The buffer of every reference BatchNorm layer that gdreg has no counterpart for.
IGNORED_BUFFER = "num_batches_tracked"
#: Index of the convolution and the BatchNorm in the reference's ``downsample`` Sequential.
_DOWNSAMPLE_INDEX = {"C": (1, 2), "B": (0, 1)}


class StateDictError(ValueError):
    """A state dict does not hold the tensors of the model; ``key`` is the key to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def reference_key(path: tuple[str, ...], shortcut: str = "C") -> str:
    """The reference's ``state_dict`` key of gdreg's variable ``path`` (collection first, e.g.
    ``("params", "stage1_block1", "conv1", "kernel")`` -> ``layers.0.0.conv1.weight``)."""
    collection, *scopes, leaf = path
    parts: list[str] = []
    for scope in scopes:
        stage_block = re.fullmatch(r"stage(\d+)_block(\d+)", scope)
        if scope == "stem_conv":
            parts += ["stem", "0"]
        elif scope == "stem_bn":
            parts += ["stem", "1"]
        elif stage_block:
            parts += ["layers", str(int(stage_block[1]) - 1), str(int(stage_block[2]) - 1)]
        elif scope == "shortcut":
            parts.append("downsample")
        elif scope in ("conv", "bn") and parts[-1:] == ["downsample"]:
            conv_index, bn_index = _DOWNSAMPLE_INDEX[shortcut]
            parts.append(str(conv_index if scope == "conv" else bn_index))
        else:
            parts.append(scope)  # conv1, bn2, fc: the same name on both sides
    if collection == "batch_stats":
        parts.append(_BUFFERS[leaf])
    else:
        parts.append("bias" if leaf == "bias" else "weight")  # kernel, scale -> weight
    return ".".join(parts)


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a gdreg variable of ``shape`` (HWIO -> OIHW, [in, out] -> [out, in])."""
    if len(shape) == 4:
        height, width, inputs, outputs = shape
        return (outputs, inputs, height, width)
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def to_gdreg_layout(value: np.ndarray) -> np.ndarray:
    """A reference tensor in gdreg's layout: convolution kernels OIHW -> HWIO, linear weights
    [out, in] -> [in, out]; vectors as they are."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def expected_keys(variables: Mapping[str, Any], shortcut: str = "C") -> dict[str, tuple]:
    """``{reference key: (gdreg path, PyTorch shape)}`` for every variable of ``variables``
    (a tree of arrays or ``jax.ShapeDtypeStruct``: ``{"params": ..., "batch_stats": ...}``)."""
    return {
        reference_key(path, shortcut): (path, torch_shape(tuple(np.shape(leaf))))
        for path, leaf in flatten_dict(variables).items()
    }


def is_ignored(key: str) -> bool:
    """Whether ``key`` is a BatchNorm counter that has no counterpart in gdreg."""
    return key.rsplit(".", 1)[-1] == IGNORED_BUFFER


#: Parameters within a block in the order the reference registers its modules (conv1, bn1,
#: nonlin, conv2, bn2, [conv3, bn3,] downsample); the shortcut's convolution, then its BatchNorm.
_BLOCK_ORDER = (
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "conv2.weight",
    "bn2.weight",
    "bn2.bias",
    "conv3.weight",
    "bn3.weight",
    "bn3.bias",
)


def _registration_rank(key: str) -> tuple:
    parts = key.split(".")
    if parts[0] == "stem":  # stem.0 (conv), stem.1 (BatchNorm): weight before bias
        return (0, int(parts[1]), parts[2] == "bias")
    if parts[0] == "layers":
        rest = ".".join(parts[3:])
        if rest in _BLOCK_ORDER:
            rank = (_BLOCK_ORDER.index(rest),)
        else:  # downsample.<index>.<weight|bias>
            rank = (len(_BLOCK_ORDER), int(parts[4]), parts[5] == "bias")
        return (1, int(parts[1]), int(parts[2]), *rank)
    return (2, parts[-1] == "bias")  # fc


def parameter_order(expected: Mapping[str, tuple]) -> list[str]:
    """The reference keys of the trainable parameters in the order of the reference model's
    ``model.parameters()`` (module registration order: stem, blocks stage by stage, fc), which
    numbers a PyTorch optimizer's state. It follows from the model, not from the order of a
    file's ``state_dict``."""
    keys = [key for key, (path, _) in expected.items() if path[0] == "params"]
    return sorted(keys, key=_registration_rank)


def architecture(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
    """What a reference ResNet ``state_dict`` holds, read from its keys and shapes: block kind
    (``"bottleneck"`` if any block has a ``conv3``), blocks per stage, width (the stem's output
    channels) and classes (``fc.weight``'s rows); None if it has no ``layers.I.J.`` keys."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state_dict:
        match = re.match(r"layers\.(\d+)\.(\d+)\.(\w+)", key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
            bottleneck = bottleneck or match[3] == "conv3"
    if not blocks:
        return None
    stem = state_dict.get("stem.0.weight")
    fc = state_dict.get("fc.weight")
    return {
        "block": "bottleneck" if bottleneck else "basic",
        "stages": tuple(len(blocks.get(stage, ())) for stage in range(max(blocks) + 1)),
        "width": None if stem is None or np.ndim(stem) != 4 else int(np.shape(stem)[0]),
        "classes": None if fc is None or np.ndim(fc) != 2 else int(np.shape(fc)[0]),
    }


def model_architecture(model: ResNet) -> dict[str, Any]:
    """:func:`architecture` of gdreg's ``model`` (without width and classes)."""
    block = "bottleneck" if model.block_cls is Bottleneck else "basic"
    return {"block": block, "stages": tuple(model.stage_sizes)}


def import_state_dict(
    state_dict: Mapping[str, np.ndarray], model: ResNet, variables: Mapping[str, Any]
) -> dict[str, Any]:
    """gdreg's variables ``{"params", "batch_stats"}`` (float32, gdreg's layouts) from the
    reference's ``state_dict`` of the same ResNet, shaped like ``variables`` (e.g.
    ``jax.eval_shape(model.init, ...)``).

    Every key of ``state_dict`` is accounted for: each maps to one variable (module
    docstring) or is a ``num_batches_tracked`` counter (ignored). Raises
    :class:`StateDictError` naming the key for another architecture (blocks of another kind
    or number), an unknown or missing key, a wrong shape, a non-floating or non-finite tensor.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"only gdreg's ResNets have the reference's names, not {type(model)}")
    expected = expected_keys(variables, model.shortcut)
    _check_architecture(state_dict, model, expected)
    unknown = [key for key in state_dict if key not in expected and not is_ignored(key)]
    if unknown:
        raise StateDictError(unknown[0], "unknown key, no tensor of the model" + _more(unknown))
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise StateDictError(missing[0], "missing" + _more(missing))
    flat = {}
    for key in state_dict:  # in the file's order: the first tensor that does not fit is named
        if is_ignored(key):
            continue
        path, shape = expected[key]
        value = np.asarray(state_dict[key])
        if value.shape != shape:
            raise StateDictError(
                key, f"shape {value.shape}, gdreg's model needs {shape}{_width_hint(state_dict)}"
            )
        flat[path] = _float32(key, value)
    for key in state_dict:
        if is_ignored(key) and np.size(state_dict[key]) != 1:
            raise StateDictError(
                key, f"a counter of shape {np.shape(state_dict[key])}, not a scalar"
            )
    return unflatten_dict(flat)


def import_parameter_tensors(
    tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple]
) -> dict[str, Any]:
    """The gdreg ``params`` tree of per-parameter tensors given by reference key (e.g. an
    optimizer's momentum buffers, already checked to have the parameters' PyTorch shapes)."""
    flat = {}
    for key, value in tensors.items():
        path, shape = expected[key]
        if np.shape(value) != shape:
            raise StateDictError(key, f"shape {np.shape(value)}, the parameter has {shape}")
        flat[path[1:]] = _float32(key, np.asarray(value))
    return unflatten_dict(flat)


def _float32(key: str, value: np.ndarray) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating):
        raise StateDictError(key, f"holds {value.dtype} values, not floating point")
    if not np.all(np.isfinite(value)):
        raise StateDictError(key, "holds NaN or infinite values")
    # gdreg's parameters and statistics are float32 (gdreg.models.layers.PARAM_DTYPE); the
    # published files are float32, so this is exact for them.
    return to_gdreg_layout(value.astype(np.float32))


def _more(keys: list[str]) -> str:
    return "" if len(keys) == 1 else f" (and {len(keys) - 1} more keys like it)"


def _width_hint(state_dict: Mapping[str, np.ndarray]) -> str:
    found = architecture(state_dict)
    if not found or found["width"] is None:
        return ""
    return f" (the file's width is {found['width']} and it has {found['classes']} classes)"


def _check_architecture(
    state_dict: Mapping[str, np.ndarray], model: ResNet, expected: Mapping[str, tuple]
) -> None:
    """Another kind or number of blocks than ``model``'s: one error naming the first key of a
    block gdreg's model does not have, or of one it has and the file lacks."""
    found = architecture(state_dict)
    wanted = model_architecture(model)
    if found is None or (found["block"], found["stages"]) == (wanted["block"], wanted["stages"]):
        return
    described = f"{found['block']} blocks {found['stages']}"
    known = _known_depth(found)
    if known:
        described += f", gdreg's {known}"
    extra = [
        key
        for key in state_dict
        if key.startswith("layers.") and key not in expected and not is_ignored(key)
    ]
    missing = [key for key in expected if key.startswith("layers.") and key not in state_dict]
    key = (extra or missing or ["layers"])[0]
    raise StateDictError(
        key,
        f"the file holds another architecture ({described}) than the model "
        f"({wanted['block']} blocks {wanted['stages']})",
    )


def _known_depth(found: Mapping[str, Any]) -> str | None:
    """The name of the registered ResNet with ``found``'s blocks, if there is one."""
    for depth, (block_cls, stages) in RESNET_CONFIGS.items():
        kind = "bottleneck" if block_cls is Bottleneck else "basic"
        if (kind, tuple(stages)) == (found["block"], found["stages"]):
            return f"resnet{depth}"
    for depth, (stages, _) in CIFAR_RESNET_CONFIGS.items():
        if ("basic", tuple(stages)) == (found["block"], found["stages"]):
            return f"resnet{depth}"
    return None
