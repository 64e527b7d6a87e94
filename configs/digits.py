"""A CPU-sized real-data demonstration: scikit-learn's 8x8 digits, SGD against full batch.

    python -m gdreg.main --config configs/digits.py:VARIANT --workdir runs/digits/VARIANT
    launch/digits_demo.sh          # all four variants, then the report

Data: the 1,797 bundled 8x8 grayscale digits (1,437 train / 360 test, no download),
augmented with a fresh random shift of at most one pixel every step (zero padding 1, no
mirror images: a mirrored digit is another symbol). Model: ``convnet2`` (two 3x3 conv
layers with 2x2 max-pooling, two linear layers, no BatchNorm) at width 16, 14k parameters.

Variants (default: ``fb_clip_reg``), scaled down from the paper's rows:

    sgd           Baseline SGD: batches of 32 (44 steps per epoch), 20 epochs, lr 0.05,
                  warmup 2, cosine-20
    fb            FB: full batch in blocks of 128, 150 steps, lr 0.2, warmup 15, cosine-200
    fb_clip       FB clipped: + gradient clipping at 0.25
    fb_clip_reg   FB regularized: + gradient-norm penalty (strength 0.5), lr 0.4

All use Nesterov momentum 0.9 and weight decay 5e-4, as the paper. The full-batch
schedule keeps the paper's proportions (warmup 10% of the run, cosine horizon 4/3 of it).
"""

from gdreg.program.config import base_config

VARIANTS = ("sgd", "fb", "fb_clip", "fb_clip_reg")
# The paper's table row each variant stands for (the report's row titles).
ROWS = {"sgd": "sgd", "fb": "longer", "fb_clip": "clipped", "fb_clip_reg": "regularized"}


def get_config(variant: str = "fb_clip_reg"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of digits.py; known: {VARIANTS}")
    config = base_config()
    config.row = ROWS[variant]
    config.model.name = "convnet2"
    config.model.width = 16
    config.data.name = "digits"
    config.data.augmentation = "random"
    config.data.padding = 1
    config.data.flip = False
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-4
    config.eval.batch_size = 360
    config.log.progress = True

    if variant == "sgd":
        config.train.mode = "stochastic"
        config.train.batch_size = 32
        config.train.epochs = 20
        config.optim.lr = 0.05
        config.optim.warmup_epochs = 2
        config.optim.cosine_epochs = 20  # over the whole run, as the paper's SGD baseline
        config.optim.clip_norm = 0.0
        config.penalty.strength = 0.0
        config.eval.every_epochs = 2
        config.checkpoint.every_epochs = 10
        return config

    config.train.mode = "fullbatch"
    config.train.block_size = 128
    config.train.epochs = 150
    config.optim.lr = 0.4 if variant == "fb_clip_reg" else 0.2
    config.optim.warmup_epochs = 15
    config.optim.cosine_epochs = 200
    config.optim.clip_norm = 0.25 if variant in ("fb_clip", "fb_clip_reg") else 0.0
    config.penalty.strength = 0.5 if variant == "fb_clip_reg" else 0.0
    config.eval.every_epochs = 10
    config.checkpoint.every_epochs = 50
    return config
