"""The paper's ResNet-18 / CIFAR-10 table, one variant per row (Geiping et al., ICLR 2022).

    python -m gdreg.main --config configs/resnet18_fb.py:VARIANT --workdir runs/VARIANT

Variants (default: ``regularized``):

    sgd            Baseline SGD: batch 128, 300 epochs, lr 0.1, 5 warmup epochs, cosine
    fb_baseline    Baseline FB: the SGD hyperparameters, full batch, 300 steps
    longer         FB train longer: 3000 steps, lr 0.4, warmup 400, cosine-4000
    clipped        FB clipped: + gradient clipping at 0.25
    regularized    FB regularized: + penalty (strength 0.5), lr 0.8, blocks of 128
    strong         FB strong reg.: blocks of 32
    practice       FB in practice: + blocks redrawn every step ("shuffle")

Fixed-dataset experiments (Sec. 4.3): ``sgd_noaug``, ``strong_noaug`` (no augmentation) and
``sgd_copies``, ``fb_copies``, ``strong_copies`` (N x CIFAR-10: N augmented copies drawn once;
N = ``data.copies``, 10 by default, e.g. ``--config.data.copies=40``). Other models:
``configs/paper.py:MODEL,ROW``.

``quick`` runs in a few minutes on a laptop CPU (a narrow ResNet-18 on 1,024 CIFAR-10
images, 40 steps, clipping and the penalty on); add ``--config.data.name=synthetic`` where
CIFAR-10 cannot be downloaded.
"""

from gdreg.program.config import PAPER_TABLE, ConfigError, paper_config

VARIANTS = (*PAPER_TABLE, "quick")


def get_config(variant: str = "regularized"):
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r} of resnet18_fb.py; known: {VARIANTS}")
    if variant != "quick":
        return paper_config("resnet18", variant)
    config = paper_config("resnet18", "regularized")
    config.row = "quick"
    config.model.width = 8
    config.data.train_size = 1024
    config.data.test_size = 1000
    config.data.synthetic_train_size = 1024
    config.data.synthetic_test_size = 1000
    config.train.epochs = 40
    config.train.block_size = 128
    config.optim.warmup_epochs = 4
    config.optim.cosine_epochs = 40
    config.eval.every_epochs = 10
    config.checkpoint.every_epochs = 10
    return config
