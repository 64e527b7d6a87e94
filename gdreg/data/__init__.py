"""Training data: host datasets (:mod:`.sources`) and on-device augmentation (:mod:`.augmentation`).

The choices of ``data.name`` and ``data.augmentation`` are declared here and the other names are
imported on first use, so that the config schema and ``gdreg.data.sources`` load without JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdreg.data.augmentation import (
        augment,
        augmentation_params,
        crop_and_flip,
        input_dtype,
        normalization_table,
        normalize,
        virtual_size,
    )
    from gdreg.data.sources import Dataset, DatasetNotFoundError, load_dataset

#: ``data.name``: the sources of :func:`gdreg.data.sources.load_dataset`.
DATASET_NAMES = ("cifar10", "cifar100", "npz", "synthetic", "digits")
#: ``data.augmentation``: the modes of :func:`gdreg.data.augmentation.augment`.
AUGMENTATIONS = ("none", "random", "fixed")

__all__ = [
    "AUGMENTATIONS",
    "DATASET_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "augment",
    "augmentation_params",
    "crop_and_flip",
    "input_dtype",
    "load_dataset",
    "normalization_table",
    "normalize",
    "virtual_size",
]
_HOST_NAMES = ("Dataset", "DatasetNotFoundError", "load_dataset")


def __getattr__(name: str):
    if name in __all__:
        owner = "sources" if name in _HOST_NAMES else "augmentation"
        return getattr(importlib.import_module(f"gdreg.data.{owner}"), name)
    raise AttributeError(f"module 'gdreg.data' has no attribute {name!r}")
