"""Training data: host datasets (:mod:`.sources`) and on-device augmentation (:mod:`.augmentation`).

The names below are imported on first use, so that ``gdreg.data.sources`` loads without JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gdreg.data.augmentation import (
        AUGMENTATIONS,
        augment,
        augmentation_params,
        crop_and_flip,
        input_dtype,
        normalization_table,
        normalize,
        virtual_size,
    )
    from gdreg.data.sources import DATASET_NAMES, Dataset, DatasetNotFoundError, load_dataset

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
_HOST_NAMES = ("DATASET_NAMES", "Dataset", "DatasetNotFoundError", "load_dataset")


def __getattr__(name: str):
    if name in __all__:
        owner = "sources" if name in _HOST_NAMES else "augmentation"
        return getattr(importlib.import_module(f"gdreg.data.{owner}"), name)
    raise AttributeError(f"module 'gdreg.data' has no attribute {name!r}")
