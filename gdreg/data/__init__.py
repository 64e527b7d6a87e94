"""Training data: host datasets (:mod:`.sources`) and on-device augmentation (:mod:`.augment`)."""

from gdreg.data.augment import (
    AUGMENTATIONS,
    augment,
    augmentation_params,
    crop_and_flip,
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
    "load_dataset",
    "normalize",
    "virtual_size",
]
