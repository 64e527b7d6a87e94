"""The paper's second table for DenseNet-121 on CIFAR-10: the ResNet-18 rows, another model.

    python -m gdreg.main --config configs/densenet121_fb.py:VARIANT --workdir runs/densenet121/VARIANT

Variants and hyperparameters are those of configs/resnet18_fb.py (default: ``regularized``);
they come from gdreg.config, shared by every model.
"""

from gdreg.config import FIXED_DATA_ROWS, PAPER_ROWS, paper_config

VARIANTS = (*PAPER_ROWS, *FIXED_DATA_ROWS)


def get_config(variant: str = "regularized"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of densenet121_fb.py; known: {VARIANTS}")
    return paper_config("densenet121", variant)
