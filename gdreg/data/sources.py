"""Datasets in host memory (numpy): CIFAR through TensorFlow Datasets, npz, synthetic, digits.

:func:`load_dataset` returns a :class:`Dataset` of uint8 NHWC images and int32 labels held
in host memory. Sources (``DATASET_NAMES``):

* ``cifar10`` / ``cifar100``: TensorFlow Datasets, read from ``data_dir`` (default: TFDS's
  own default, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``). The dataset is only
  downloaded when it is not prepared there and ``download=True``; any failure of that
  (no network, ...) becomes a :class:`DatasetNotFoundError` that says how to prepare it.
  With ``download=False`` a missing dataset fails at once, without touching the network.
* ``npz``: a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``.
* ``synthetic``: seeded random images whose labels are learnable (class prototypes).
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download).

Nothing here imports JAX: the images go to the devices in :mod:`gdreg.program.experiment`, and are
augmented there by :mod:`gdreg.data.augmentation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import urllib.parse
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from gdreg.data import DATASET_NAMES

# Per-channel statistics in [0, 1] units. CIFAR-10: the reference implementation's figures.
CIFAR10_MEAN = (0.4915, 0.4823, 0.4468)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_TFDS_DATASETS = {
    "cifar10": (10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (100, CIFAR100_MEAN, CIFAR100_STD),
}
# Where TFDS's builders download the raw archives from (tensorflow_datasets' cifar.py).
# Only used to check, before TFDS tries, that the host can be reached at all: offline,
# TFDS's own retries (10, exponential backoff) take minutes to give up.
_TFDS_DOWNLOAD_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
}
_PROBE_TIMEOUT_S = 5.0

DIGITS_TRAIN_SIZE = 1437
DIGITS_TEST_SIZE = 360


class DatasetNotFoundError(RuntimeError):
    """A TFDS dataset is not prepared in ``data_dir`` and could not be downloaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset in host memory.

    ``eq=False``: instances compare (and hash) by identity; comparing arrays field by
    field would be ambiguous.
    """

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean in [0, 1] units, for normalize()
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    npz_path: str | None = None,
    train_size: int = 0,
    test_size: int = 0,
    seed: int = 0,
    synthetic_shape: tuple[int, int, int] = (32, 32, 3),
    synthetic_num_classes: int = 10,
    synthetic_train_size: int = 512,
    synthetic_test_size: int = 256,
    download: bool = True,
) -> Dataset:
    """Loads dataset ``name`` (one of ``DATASET_NAMES``) into host memory.

    Args:
      name: ``cifar10``, ``cifar100`` (TFDS), ``npz``, ``synthetic`` or ``digits``.
      data_dir: TFDS data directory (cifar only); ``None`` = TFDS's default.
      npz_path: the ``.npz`` file (``npz`` only).
      train_size, test_size: if > 0, keep a deterministic, class-stratified subset of
        that many images (chosen by ``seed``, kept in the original order); 0 = all.
      seed: selects the subsets, and the images of ``synthetic``.
      synthetic_*: shape ``(H, W, C)``, classes and sizes of the ``synthetic`` dataset.
      download: cifar only: if the dataset is not prepared in ``data_dir``, try to
        download and prepare it (needs network). ``False`` fails at once instead.

    Raises:
      ValueError: an invalid argument; the message starts with the argument's name
        (``name``, ``npz_path``, ``train_size``, ...).
      DatasetNotFoundError: a TFDS dataset is missing and could not be downloaded.
    """
    if name in _TFDS_DATASETS:
        train_x, train_y, test_x, test_y, num_classes = _load_tfds(
            name, data_dir=data_dir, download=download
        )
        _, mean, std = _TFDS_DATASETS[name]
    elif name == "npz":
        train_x, train_y, test_x, test_y = _load_npz(npz_path)
        num_classes = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
        mean, std = _channel_stats(train_x)
    elif name == "synthetic":
        train_x, train_y, test_x, test_y = _make_synthetic(
            seed=seed,
            shape=synthetic_shape,
            num_classes=synthetic_num_classes,
            train_size=synthetic_train_size,
            test_size=synthetic_test_size,
        )
        num_classes = int(synthetic_num_classes)
        mean, std = _channel_stats(train_x)
    elif name == "digits":
        train_x, train_y, test_x, test_y = _load_digits()
        num_classes = 10
        mean, std = _channel_stats(train_x)
    else:
        raise ValueError(f"name={name!r} is not a known dataset; choose one of {DATASET_NAMES}")

    train_x, train_y = _subset(train_x, train_y, train_size, seed=seed, field="train_size")
    test_x, test_y = _subset(test_x, test_y, test_size, seed=seed + 1, field="test_size")
    return Dataset(
        name=name,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=num_classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def declared_shape(
    name: str,
    *,
    synthetic_shape: tuple[int, int, int] = (32, 32, 3),
    synthetic_num_classes: int = 10,
) -> tuple[int | None, int | None]:
    """``(classes, image channels)`` of dataset ``name`` as :func:`load_dataset` will give
    them, known without loading it; None where only the data tell (``npz``)."""
    if name in _TFDS_DATASETS:
        return _TFDS_DATASETS[name][0], 3
    if name == "synthetic":
        return int(synthetic_num_classes), int(synthetic_shape[-1])
    if name == "digits":
        return 10, 1
    return None, None


def _subset(
    images: np.ndarray, labels: np.ndarray, size: int, *, seed: int, field: str
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic class-stratified subset of ``size`` examples (0 = all).

    The examples are permuted with ``seed``, then ordered by their rank within their class
    (stable), so the first ``size`` take the classes in turn: each class gets
    ``size // num_classes`` or one more, as far as it has examples. The chosen examples are
    returned in their original order.
    """
    n = int(images.shape[0])
    size = int(size)
    if size < 0 or size > n:
        raise ValueError(f"{field}={size} must be between 0 (all) and the {n} examples available")
    if size == 0 or size == n:
        return images, labels
    perm = np.random.default_rng(seed).permutation(n)
    perm_labels = labels[perm]
    rank = np.empty(n, dtype=np.int64)
    for c in np.unique(perm_labels):
        where = np.flatnonzero(perm_labels == c)
        rank[where] = np.arange(where.size)
    order = perm[np.argsort(rank, kind="stable")]
    keep = np.sort(order[:size])
    return images[keep], labels[keep]


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (errors here are one-line messages)."""
    return " ".join(str(error).split())


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units (std 0 -> 1)."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _tfds_not_found_message(name: str, root: str, variant_dir: str, reason: str) -> str:
    return (
        f"TFDS dataset '{name}' is not prepared in data_dir={root!r} (looked for "
        f"{variant_dir}){reason}. Prepare it on a machine with network access with "
        f'`tfds build {name} --data_dir {root}` (or python -c "import tensorflow_datasets '
        f"as tfds; tfds.builder('{name}', data_dir='{root}').download_and_prepare()\"), or "
        f"copy an existing ~/tensorflow_datasets (it holds a '{name}' folder) to the "
        "cluster, and pass that folder as data_dir"
    )


def _load_tfds(
    name: str, *, data_dir: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Reads both splits of a TFDS image classification dataset into numpy.

    Uses the builder API rather than ``tfds.load``: it checks ``builder.is_prepared()``
    first, so that a missing dataset with ``download=False`` fails without any network
    access, and only then calls ``download_and_prepare``. The splits are read in chunks
    rather than with ``batch_size=-1``, which batches by ``sys.maxsize`` when the split
    sizes are unknown (as under ``tfds.testing.mock_data``) and aborts TensorFlow.
    """
    import tensorflow_datasets as tfds

    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = tfds.builder(name, data_dir=data_dir)
    root = os.fspath(getattr(builder, "data_dir_root", None) or data_dir or "")
    variant_dir = os.fspath(builder.data_dir)
    if not builder.is_prepared():
        if not download:
            raise DatasetNotFoundError(
                _tfds_not_found_message(name, root, variant_dir, " and download=False")
            )
        unreachable = _download_host_unreachable(_TFDS_DOWNLOAD_URLS[name])
        if unreachable:
            raise DatasetNotFoundError(
                _tfds_not_found_message(
                    name,
                    root,
                    variant_dir,
                    f" and there is no network to download it ({unreachable})",
                )
            )
        try:
            builder.download_and_prepare()
        except Exception as e:
            reason = f" and downloading it failed ({type(e).__name__}: {_one_line(e)})"
            raise DatasetNotFoundError(
                _tfds_not_found_message(name, root, variant_dir, reason)
            ) from e

    _hide_gpus_from_tensorflow()
    splits = []
    for split in ("train", "test"):
        try:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        except AssertionError as e:  # TFDS: "Dataset ...: could not find data in ..."
            reason = f" ({_one_line(e)})"
            raise DatasetNotFoundError(
                _tfds_not_found_message(name, root, variant_dir, reason)
            ) from e
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(10_000)):
            xs.append(np.asarray(x, dtype=np.uint8))
            ys.append(np.asarray(y).astype(np.int32))
        splits.append((np.concatenate(xs), np.concatenate(ys)))
    num_classes = _TFDS_DATASETS[name][0]
    with contextlib.suppress(KeyError, AttributeError, TypeError):
        num_classes = int(builder.info.features["label"].num_classes)
    (train_x, train_y), (test_x, test_y) = splits
    return train_x, train_y, test_x, test_y, num_classes


def _download_host_unreachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached (``None`` if a TCP connection opens).

    Bounded by ``timeout`` seconds, DNS included (the probe runs in a daemon thread).
    Skipped (``None``) when a proxy is configured, since then a direct connection says
    nothing about whether the download can work.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not result:
        return f"no connection to {host}:{port} within {timeout:g} s"
    return result[0]


def _hide_gpus_from_tensorflow() -> None:
    """TensorFlow only feeds data here: keep it off the accelerators JAX uses."""
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # already initialized, or no tensorflow GPU support: fine
        pass


def _load_npz(npz_path: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads and validates an npz dataset.

    Images: uint8 ``[N, H, W, C]`` with 1, 3 or 4 channels last; ``[N, H, W]`` (grayscale)
    gets a channel axis; channels-first ``[N, C, H, W]`` is refused, not guessed, and so are
    other channel counts; float images must be finite and lie in [0, 1] and are converted to
    uint8 (``round(x * 255)``; floats that would all become 0 or 1, i.e. divided by 255 twice,
    are refused); other integer images must lie in 0..255. Labels: integers ``[N]`` (or
    ``[N, 1]``) numbering the classes 0..K-1: every label in 0..max(y_train) must occur in
    ``y_train`` (a stray large label, a typo or ids that start at 1000, would make the model's
    output layer that wide), and every test label among the training labels; a label outside
    int32 is refused before it could wrap. Neither split may be empty.

    Every array's size, as its header declares it, is checked against what its archive member
    holds and against the host's memory before anything is allocated.
    """
    if not npz_path:
        raise ValueError("npz_path must be set for the npz dataset")
    path = os.path.expanduser(os.fspath(npz_path))
    if not os.path.isfile(path):
        raise ValueError(f"npz_path={npz_path!r}: file not found")
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not npz, or pickled
        raise ValueError(f"npz_path={npz_path!r}: cannot read it as .npz ({_one_line(e)})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"npz_path={npz_path!r}: holds a single array, not an .npz archive")
    with loaded as f:
        missing = [k for k in keys if k not in f.files]
        if missing:
            raise ValueError(
                f"npz_path={npz_path!r} lacks key(s) {missing}; "
                f"expected {list(keys)}, found {sorted(f.files)}"
            )
        _check_declared_sizes(f, keys, npz_path)
        try:
            arrays = {k: np.asarray(f[k]) for k in keys}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # a pickled (object) array, or a damaged archive member
            raise ValueError(
                f"npz_path={npz_path!r}: cannot read its arrays ({_one_line(e)})"
            ) from e
    out = []
    for split in ("train", "test"):
        x = _npz_images(arrays[f"x_{split}"], npz_path, f"x_{split}")
        y = _npz_labels(arrays[f"y_{split}"], npz_path, f"y_{split}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"npz_path={npz_path!r}: x_{split} has {x.shape[0]} images but "
                f"y_{split} has {y.shape[0]} labels"
            )
        out += [x, y]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise ValueError(
            f"npz_path={npz_path!r}: x_train images are {out[0].shape[1:]} but x_test "
            f"images are {out[2].shape[1:]}"
        )
    for split, labels in (("train", out[1]), ("test", out[3])):
        if labels.size == 0:
            raise ValueError(f"npz_path={npz_path!r}: the {split} split is empty")
    unknown = np.setdiff1d(out[3], out[1])
    if unknown.size:
        first = int(np.flatnonzero(np.isin(out[3], unknown))[0])
        raise ValueError(
            f"npz_path={npz_path!r}: y_test has labels that y_train does not have "
            f"({', '.join(str(label) for label in unknown[:5])}"
            f"{', ...' if unknown.size > 5 else ''}), the first y_test[{first}] = "
            f"{out[3][first]}; every test class must be a training class"
        )
    _check_classes_numbered(out[1], npz_path)
    return out[0], out[1], out[2], out[3]


def _check_declared_sizes(archive: np.lib.npyio.NpzFile, keys: Sequence[str], npz_path) -> None:
    """Refuses arrays whose header declares more bytes than their archive member holds (a
    damaged or hand-made header: ``(10**9, 32, 32, 3)`` over a few kilobytes) or more than
    the host's memory, before numpy allocates them (which would fail with a MemoryError, or
    get the process killed)."""
    fmt = np.lib.format
    total = 0
    for key in keys:
        info = archive.zip.getinfo(f"{key}.npy")
        with archive.zip.open(info) as member:
            try:
                version = fmt.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = fmt.read_array_header_1_0(member)
                else:
                    shape, _, dtype = fmt.read_array_header_2_0(member)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(
                    f"npz_path={npz_path!r}: {key} has no readable array header ({_one_line(e)})"
                ) from e
            header = member.tell()
        if dtype.hasobject:
            raise ValueError(
                f"npz_path={npz_path!r}: {key} holds Python objects (pickled), not numbers"
            )
        declared = dtype.itemsize * int(np.prod(shape, dtype=object))
        held = info.file_size - header
        if declared > held:
            raise ValueError(
                f"npz_path={npz_path!r}: {key} declares shape {tuple(shape)} {dtype} "
                f"({_size(declared)}), but its archive member holds {_size(held)}: the file "
                "is damaged, or its header was written by hand"
            )
        total += declared
    memory = _host_memory()
    if memory and total > memory:
        raise ValueError(
            f"npz_path={npz_path!r}: its arrays take {_size(total)}, more than this host's "
            f"memory ({_size(memory)})"
        )


def _host_memory() -> int | None:
    """Bytes of physical memory of this host (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(size: int) -> str:
    """A byte count for a message: ``12 KiB``, ``3.1 TiB``."""
    value, unit = float(size), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.3g} {unit}" if unit != "bytes" else f"{size} bytes"


def _check_classes_numbered(labels: np.ndarray, npz_path) -> None:
    """Refuses training labels that leave classes of 0..max(labels) without an image: the
    model gets one output per class 0..max, and a stray large label (a typo: 10**8) or ids
    that start elsewhere (1000..1003) would make that layer huge or mostly dead."""
    present = np.unique(labels)
    largest = int(present[-1])
    if present.size == largest + 1:
        return
    index = int(np.argmax(labels))
    missing = np.setdiff1d(np.arange(min(largest + 1, present.size + 3)), present)[:3]
    raise ValueError(
        f"npz_path={npz_path!r}: y_train[{index}] = {largest}, so the model would have "
        f"{largest + 1} classes (0..{largest}), but only {present.size} of them occur in y_train "
        f"(none has label {', '.join(str(label) for label in missing)}, ...); number the "
        "classes 0..K-1, e.g. y = np.unique(y, return_inverse=True)[1] over both splits"
    )


def _npz_images(x: np.ndarray, npz_path: str, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"npz_path={npz_path!r}: {key} must be [N, H, W, C] or [N, H, W], got shape {x.shape}"
        )
    if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        raise ValueError(
            f"npz_path={npz_path!r}: {key} of shape {x.shape} looks channels-first "
            f"[N, C, H, W]; store it as [N, H, W, C] (np.transpose(x, (0, 2, 3, 1)))"
        )
    if x.shape[3] not in (1, 3, 4):
        raise ValueError(
            f"npz_path={npz_path!r}: {key} of shape {x.shape} has {x.shape[3]} channels; "
            "images have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, last"
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise ValueError(f"npz_path={npz_path!r}: {key} has {bad} NaN or infinite pixels")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(
                f"npz_path={npz_path!r}: float {key} must lie in [0, 1], got [{x.min()}, {x.max()}]"
            )
        if x.size and 0.0 < x.max() < 1.5 / 255.0:
            raise ValueError(
                f"npz_path={npz_path!r}: float {key} lies in [{x.min()}, {x.max()}]: divided "
                "by 255 twice? As 8-bit images (round(x * 255)) every pixel would be 0 or 1; "
                "store floats in [0, 1] or uint8 0..255"
            )
        return np.round(x.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"npz_path={npz_path!r}: integer {key} must lie in 0..255, "
                f"got [{x.min()}, {x.max()}]"
            )
        return x.astype(np.uint8)
    raise ValueError(f"npz_path={npz_path!r}: {key} has unsupported dtype {x.dtype}")


def _npz_labels(y: np.ndarray, npz_path: str, key: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise ValueError(
            f"npz_path={npz_path!r}: {key} must be integer labels [N], got {y.dtype} {y.shape}"
        )
    if y.size and y.min() < 0:
        index = int(np.argmin(y))
        raise ValueError(
            f"npz_path={npz_path!r}: {key} has negative labels ({key}[{index}] = {y[index]})"
        )
    if y.size and y.max() > np.iinfo(np.int32).max:  # int32 would wrap it to another class
        index = int(np.argmax(y))
        raise ValueError(
            f"npz_path={npz_path!r}: {key}[{index}] = {y[index]} is beyond int32 (a typo?); "
            "labels number the classes 0..K-1"
        )
    return y.astype(np.int32)


def _make_synthetic(
    *, seed: int, shape: Sequence[int], num_classes: int, train_size: int, test_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random images whose class is learnable, also under crop/flip augmentation.

    Each class has a prototype: a smooth (low-resolution, upsampled), left-right symmetric
    random pattern plus a class colour. An image is its class prototype plus Gaussian
    noise, clipped to uint8. Labels are balanced (``i % num_classes``, shuffled).
    """
    h, w, c = (int(d) for d in shape)
    if min(h, w, c) < 1:
        raise ValueError(f"synthetic_shape={tuple(shape)} must be positive")
    if num_classes < 1:
        raise ValueError(f"synthetic_num_classes={num_classes} must be >= 1")
    if train_size < 1 or test_size < 0:
        raise ValueError(
            f"synthetic_train_size={train_size} must be >= 1 and "
            f"synthetic_test_size={test_size} >= 0"
        )
    rng = np.random.default_rng(seed)
    cell = 4
    gh, gw = -(-h // cell), -(-w // cell)
    coarse = rng.uniform(-1.0, 1.0, size=(num_classes, gh, gw, c))
    coarse = 0.5 * (coarse + coarse[:, :, ::-1, :])  # left-right symmetric: flip-invariant
    pattern = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)[:, :h, :w, :]
    colour = rng.uniform(-1.0, 1.0, size=(num_classes, 1, 1, c))
    prototypes = 128.0 + 48.0 * pattern + 40.0 * colour

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        noise = rng.normal(0.0, 40.0, size=(n, h, w, c))
        images = np.clip(np.round(prototypes[labels] + noise), 0, 255).astype(np.uint8)
        return images, labels

    train_x, train_y = draw(int(train_size))
    test_x, test_y = draw(int(test_size))
    return train_x, train_y, test_x, test_y


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: 1,797 8x8 grayscale images, as uint8 [n, 8, 8, 1].

    Pixel values 0..16 are scaled to 0..255 (``round(x * 255 / 16)``). The split is fixed
    (seed 0, independent of ``load_dataset``'s seed) and stratified: 360 test images,
    allotted to the classes in proportion to their size (largest remainders), the other
    1,437 for training; both keep the original order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.round(np.asarray(digits.images, np.float64) * (255.0 / 16.0))
    x = np.clip(x, 0, 255).astype(np.uint8)[..., None]
    y = np.asarray(digits.target).astype(np.int32)
    n = y.shape[0]
    rng = np.random.default_rng(0)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * DIGITS_TEST_SIZE / n
    take = np.floor(quota).astype(np.int64)
    extra = DIGITS_TEST_SIZE - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    )
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    return x[~is_test], y[~is_test], x[is_test], y[is_test]
