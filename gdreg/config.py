"""The configuration schema and the paper's table rows, shared by the files in ``configs/``.

Units: an *epoch* is one pass over the training set; in full-batch mode one optimizer step
is one epoch, so ``train.epochs`` is the number of full-batch steps and every schedule length
is counted in epochs in both modes. Hyperparameters: ../shared/REFERENCE.md, i.e. Geiping et
al. (ICLR 2022) and the authors' configuration files.
"""

import ml_collections

# The rows of the paper's tables (ResNet-18, ResNet-50, ResNet-152, DenseNet-121), then the
# fixed-dataset experiments of Sec. 4.3 (no augmentation; N x CIFAR with N = data.copies).
PAPER_ROWS = (
    "sgd",
    "fb_baseline",
    "longer",
    "clipped",
    "regularized",
    "strong",
    "practice",
)
FIXED_DATA_ROWS = ("sgd_noaug", "strong_noaug", "sgd_copies", "fb_copies", "strong_copies")
ROW_TITLES = {
    "sgd": "Baseline SGD",
    "fb_baseline": "Baseline FB",
    "longer": "FB train longer",
    "clipped": "FB clipped",
    "regularized": "FB regularized",
    "strong": "FB strong reg.",
    "practice": "FB in practice",
    "sgd_noaug": "SGD, no augmentation",
    "strong_noaug": "FB strong reg., no augmentation",
    "sgd_copies": "SGD, N x CIFAR",
    "fb_copies": "FB, N x CIFAR",
    "strong_copies": "FB strong reg., N x CIFAR",
}


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, set to the paper's "FB regularized" ResNet-18 run."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.row = ""  # the table row this config reproduces, for reports

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"
    config.model.width = 64
    config.model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"  # cifar10 | cifar100 | npz | synthetic | digits
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    config.data.download = True  # TFDS: download and prepare the dataset if it is missing
    config.data.npz_path = ""
    config.data.train_size = 0  # 0: the whole training split
    config.data.test_size = 0
    config.data.augmentation = "random"  # random (fresh every step) | fixed | none
    config.data.copies = 1  # fixed: N x augmented copies, drawn once
    config.data.padding = 4
    config.data.flip = True
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
    config.train.blocks_per_microbatch = 0  # 0: backend default (1 on CPU, 4 on GPU)
    config.train.microbatch_loop = ""  # python | scan; "": backend default
    config.train.block_loop = ""  # unroll | vmap; "": backend default
    config.train.cpu_devices = 0  # CPU backend: devices to split the host into; 0: auto

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 0.8
    config.optim.schedule = "warmup_cosine"  # warmup_cosine | warmup_constant
    config.optim.warmup_epochs = 400
    config.optim.cosine_epochs = 4000  # cosine horizon, counted from the end of warmup
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-4
    config.optim.clip_norm = 0.25  # global L2 norm of the mean gradient; 0 turns clipping off

    config.penalty = ml_collections.ConfigDict()
    config.penalty.strength = 0.5  # 0 turns the regularizer off
    config.penalty.method = "forward"  # forward | central | jvp
    config.penalty.eps = 1e-2
    config.penalty.full_strength = 0.0

    config.eval = ml_collections.ConfigDict()
    config.eval.every_epochs = 100
    config.eval.batch_size = 1000
    config.eval.flip_average = False

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_epochs = 50
    config.checkpoint.keep = 3

    config.log = ml_collections.ConfigDict()
    config.log.progress = True  # progress bar on the console
    return config


def _sgd_baseline(config: ml_collections.ConfigDict) -> None:
    config.train.mode = "stochastic"
    config.train.batch_size = 128
    config.train.epochs = 300
    config.optim.lr = 0.1
    config.optim.warmup_epochs = 5
    config.optim.cosine_epochs = 300  # the reference's cosine-decay over all 300 epochs
    config.optim.clip_norm = 0.0
    config.penalty.strength = 0.0
    config.eval.every_epochs = 10
    config.checkpoint.every_epochs = 10


def _full_batch(config: ml_collections.ConfigDict, *, clip: bool, regularize: bool) -> None:
    config.train.mode = "fullbatch"
    config.train.epochs = 3000
    config.train.block_size = 128
    config.optim.lr = 0.8 if regularize else 0.4
    config.optim.warmup_epochs = 400
    config.optim.cosine_epochs = 4000
    config.optim.clip_norm = 0.25 if clip else 0.0
    config.penalty.strength = 0.5 if regularize else 0.0


def apply_row(config: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
    """Sets the hyperparameters of one table row (see ``PAPER_ROWS``, ``FIXED_DATA_ROWS``).

    Baseline SGD: batch 128, 300 epochs, lr 0.1, 5 warmup epochs, cosine to 0. Baseline FB: the
    same, full batch. The 3000-step rows: lr 0.4 (0.8 with the penalty), 400 warmup steps,
    cosine horizon 4000 from the end of warmup, clipping at 0.25 ("clipped" onwards), penalty
    strength 0.5 with blocks of 128 ("regularized") or 32 ("strong", "practice"), blocks
    redrawn every step ("practice").
    """
    if row not in PAPER_ROWS + FIXED_DATA_ROWS:
        raise ValueError(f"unknown row {row!r}; known: {PAPER_ROWS + FIXED_DATA_ROWS}")
    config.row = row
    if row.startswith("sgd"):
        _sgd_baseline(config)
    elif row == "fb_baseline":
        _sgd_baseline(config)
        config.train.mode = "fullbatch"
    elif row in ("longer", "fb_copies"):
        _full_batch(config, clip=False, regularize=False)
    elif row == "clipped":
        _full_batch(config, clip=True, regularize=False)
    else:
        _full_batch(config, clip=True, regularize=True)
    if row.startswith("strong") or row == "practice":
        config.train.block_size = 32
    if row == "practice":
        config.train.shuffle_blocks = True
    if row.endswith("_noaug"):
        config.data.augmentation = "none"
    if row.endswith("_copies"):
        config.data.augmentation = "fixed"
        config.data.copies = 10
    return config


def paper_config(model: str, row: str, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The config of one table row for ``model`` on ``dataset``."""
    config = base_config()
    config.model.name = model
    config.data.name = dataset
    return apply_row(config, row)
