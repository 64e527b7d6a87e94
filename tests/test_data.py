"""Tests for gdreg.data: loading (TFDS under mock_data, npz, synthetic, digits) and augmentation."""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdreg import data
from gdreg.data import sources

# --------------------------------------------------------------------------------------
# TFDS (cifar10 / cifar100)
# --------------------------------------------------------------------------------------


@pytest.fixture
def mock_tfds(monkeypatch):
    """``tfds.testing.mock_data`` around the real loading code, offline.

    mock_data makes ``download_and_prepare`` a no-op and generates random examples from
    the builder's feature spec (no metadata files are needed: it falls back to the
    dataset's code). The reachability probe that guards the download is stubbed out, as
    if there were network.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "_download_host_unreachable", lambda url, **kw: None)

    def mock(num_examples):
        return tfds.testing.mock_data(num_examples=num_examples)

    return mock


@pytest.mark.parametrize(
    ("name", "num_classes", "mean", "std"),
    [
        ("cifar10", 10, sources.CIFAR10_MEAN, sources.CIFAR10_STD),
        ("cifar100", 100, sources.CIFAR100_MEAN, sources.CIFAR100_STD),
    ],
)
def test_tfds_load_under_mock_data(mock_tfds, tmp_path, name, num_classes, mean, std):
    with mock_tfds(num_examples=40):
        full = data.load_dataset(name, data_dir=str(tmp_path))
        sub = data.load_dataset(name, data_dir=str(tmp_path), train_size=12, test_size=8, seed=3)
        with pytest.raises(ValueError, match=r"^train_size=41"):
            data.load_dataset(name, data_dir=str(tmp_path), train_size=41)
    assert full.name == name
    assert full.train_images.shape == (40, 32, 32, 3)
    assert full.test_images.shape == (40, 32, 32, 3)
    assert full.train_images.dtype == np.uint8 and full.test_images.dtype == np.uint8
    assert full.train_labels.shape == (40,) and full.test_labels.shape == (40,)
    assert full.train_labels.dtype == np.int32 and full.test_labels.dtype == np.int32
    for labels in (full.train_labels, full.test_labels):
        assert labels.min() >= 0 and labels.max() < num_classes
    assert full.train_images.max() > full.train_images.min()  # not a constant fill
    assert full.num_classes == num_classes
    assert full.mean == mean and full.std == std
    assert full.image_shape == (32, 32, 3) and full.num_train == 40 and full.num_test == 40
    assert sub.train_images.shape == (12, 32, 32, 3) and sub.train_labels.shape == (12,)
    assert sub.test_images.shape == (8, 32, 32, 3) and sub.test_labels.shape == (8,)
    # The subset is made of rows of the full set (mock_data is deterministic).
    full_rows = {img.tobytes() for img in full.train_images}
    assert all(img.tobytes() in full_rows for img in sub.train_images)


def test_tfds_reads_a_prepared_dataset(tmp_path, monkeypatch):
    """The real (unmocked) read path on a small dataset prepared in data_dir.

    The dataset is written under cifar10's name and version with cifar10's features by
    ``store_as_tfds_dataset``; reading it goes through ``is_prepared()`` and the real
    ``as_dataset``. TFDS 4.9.x's writer needs ``importlib_resources``, which it does not
    declare for Python >= 3.9; the standard library's ``importlib.resources`` stands in.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        import importlib.resources
        import importlib.resources.abc

        from tensorflow_datasets.core import dataset_builder

        monkeypatch.setattr(
            dataset_builder, "importlib_resources", importlib.resources, raising=False
        )
    builder = tfds.builder("cifar10")
    rng = np.random.default_rng(0)

    def examples(n, prefix):
        return [
            (
                f"{prefix}{i}",
                {
                    "id": f"{prefix}{i}",
                    "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                    "label": i % 10,
                },
            )
            for i in range(n)
        ]

    train, test = examples(30, "train_"), examples(12, "test_")
    tfds.dataset_builders.store_as_tfds_dataset(
        name="cifar10",
        version=str(builder.version),
        features=builder.info.features,
        split_datasets={"train": train, "test": test},
        data_dir=str(tmp_path),
        disable_shuffling=True,
    )

    def no_download(self, *args, **kwargs):
        raise AssertionError("a prepared dataset must not be downloaded")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path), test_size=5)
    assert ds.train_images.shape == (30, 32, 32, 3) and ds.test_images.shape == (5, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.mean == sources.CIFAR10_MEAN
    np.testing.assert_array_equal(ds.train_images, np.stack([ex["image"] for _, ex in train]))
    np.testing.assert_array_equal(ds.train_labels, [ex["label"] for _, ex in train])


def test_tfds_missing_dataset_without_download_is_fast(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_network(*args, **kwargs):
        raise AssertionError("download=False must not touch the network")

    monkeypatch.setattr(sources, "_download_host_unreachable", no_network)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert time.monotonic() - start < 10.0
    message = str(info.value)
    assert f"tfds build cifar10 --data_dir {tmp_path}" in message
    assert str(tmp_path) in message and message.endswith("pass that folder as data_dir")
    assert "\n" not in message


def test_tfds_missing_dataset_offline_skips_download(tmp_path, monkeypatch):
    """download=True without network: the probe fails and TFDS's download is never tried."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(
        sources, "_download_host_unreachable", lambda url, **kw: "cannot connect (test)"
    )

    def no_download(self, *args, **kwargs):
        raise AssertionError("download_and_prepare must not be called without network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError, match="no network") as info:
        data.load_dataset("cifar100", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10.0
    assert f"tfds build cifar100 --data_dir {tmp_path}" in str(info.value)


def test_tfds_failed_download_becomes_dataset_not_found(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(sources, "_download_host_unreachable", lambda url, **kw: None)

    def failing_download(self, *args, **kwargs):
        raise ConnectionError("simulated\nfailure")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", failing_download)
    with pytest.raises(data.DatasetNotFoundError, match="downloading it failed") as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert isinstance(info.value.__cause__, ConnectionError)
    assert "\n" not in str(info.value) and "tfds build cifar10" in str(info.value)


def test_download_probe_on_loopback(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert sources._download_host_unreachable(f"http://127.0.0.1:{port}/x", timeout=2.0) is None
    # Same port, now closed: connection refused.
    reason = sources._download_host_unreachable(f"http://127.0.0.1:{port}/x", timeout=2.0)
    assert reason is not None and "127.0.0.1" in reason


# --------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _npz_arrays(rng, n_train=20, n_test=10, shape=(6, 5, 3)):
    return dict(
        x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        y_train=rng.permutation(np.arange(n_train) % 4).astype(np.int64),
        x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        y_test=rng.integers(0, 4, n_test).astype(np.int64),
    )


def test_npz_round_trip(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0))
    arrays["y_test"] = arrays["y_test"][:, None]  # [N, 1] labels (as Keras ships them) work
    ds = data.load_dataset("npz", npz_path=_write_npz(tmp_path / "d.npz", **arrays))
    np.testing.assert_array_equal(ds.train_images, arrays["x_train"])
    np.testing.assert_array_equal(ds.test_images, arrays["x_test"])
    np.testing.assert_array_equal(ds.train_labels, arrays["y_train"])
    np.testing.assert_array_equal(ds.test_labels, arrays["y_test"][:, 0])
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.num_classes == int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    x = arrays["x_train"] / 255.0
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-6)


def test_npz_grayscale_and_float_images(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (8, 4, 4), dtype=np.uint8)
    floats = rng.uniform(0, 1, (3, 4, 4)).astype(np.float32)
    path = _write_npz(
        tmp_path / "g.npz", x_train=gray, y_train=np.arange(8), x_test=floats, y_test=np.arange(3)
    )
    ds = data.load_dataset("npz", npz_path=path)
    assert ds.train_images.shape == (8, 4, 4, 1) and ds.test_images.shape == (3, 4, 4, 1)
    np.testing.assert_array_equal(ds.train_images[..., 0], gray)
    assert ds.test_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.test_images[..., 0], np.round(floats * 255).astype(np.uint8))
    assert len(ds.mean) == 1 and len(ds.std) == 1


def _npz_error(tmp_path, **arrays):
    with pytest.raises(ValueError) as info:
        data.load_dataset("npz", npz_path=_write_npz(tmp_path / "bad.npz", **arrays))
    message = str(info.value)
    assert message.startswith("npz_path") and "\n" not in message
    return message


def test_npz_errors_name_the_field(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(2))
    for kwargs in ({}, {"npz_path": None}, {"npz_path": str(tmp_path / "missing.npz")}):
        with pytest.raises(ValueError, match=r"^npz_path"):
            data.load_dataset("npz", **kwargs)
    message = _npz_error(tmp_path, **{k: v for k, v in arrays.items() if k != "x_test"})
    assert "x_test" in message
    message = _npz_error(tmp_path, **{**arrays, "y_train": arrays["y_train"][:-1]})
    assert "x_train" in message and "y_train" in message
    message = _npz_error(tmp_path, **{**arrays, "y_test": arrays["y_test"][:-2]})
    assert "x_test" in message and "y_test" in message
    _npz_error(tmp_path, **{**arrays, "x_train": arrays["x_train"] * 2.0})  # float not in [0, 1]
    # channels-first images, a test class the training set lacks, empty splits, NaN pixels
    message = _npz_error(tmp_path, **{**arrays, "x_train": np.zeros((20, 3, 8, 8), np.uint8)})
    assert "channels-first" in message and "x_train" in message
    message = _npz_error(tmp_path, **{**arrays, "y_test": np.full(10, 50)})
    assert "y_test has labels that y_train does not have (50)" in message
    message = _npz_error(tmp_path, **{**arrays, "x_test": arrays["x_test"][:0], "y_test": []})
    assert "the test split is empty" in message
    nan_images = np.full((20, 6, 5, 3), np.nan, np.float32)
    assert "x_train" in _npz_error(tmp_path, **{**arrays, "x_train": nan_images})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path(_write_npz(tmp_path / "whole.npz", **arrays)).read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"^npz_path"):
        data.load_dataset("npz", npz_path=str(truncated))
    not_npz = tmp_path / "not.npz"
    not_npz.write_bytes(b"definitely not a zip file")
    with pytest.raises(ValueError, match=r"^npz_path"):
        data.load_dataset("npz", npz_path=str(not_npz))


def test_subset_is_stratified_deterministic_and_validated(tmp_path):
    rng = np.random.default_rng(3)
    arrays = _npz_arrays(rng, n_train=100, n_test=30)
    arrays["y_train"] = np.arange(100) % 4
    path = _write_npz(tmp_path / "d.npz", **arrays)
    a = data.load_dataset("npz", npz_path=path, train_size=20, test_size=7, seed=5)
    b = data.load_dataset("npz", npz_path=path, train_size=20, test_size=7, seed=5)
    c = data.load_dataset("npz", npz_path=path, train_size=20, test_size=7, seed=6)
    assert a.num_train == 20 and a.num_test == 7
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    np.testing.assert_array_equal(np.bincount(a.train_labels, minlength=4), [5, 5, 5, 5])
    # Normalization statistics come from the whole training set, not the subset.
    assert a.mean == data.load_dataset("npz", npz_path=path).mean
    with pytest.raises(ValueError, match=r"^train_size=-1"):
        data.load_dataset("npz", npz_path=path, train_size=-1)
    with pytest.raises(ValueError, match=r"^test_size=31"):
        data.load_dataset("npz", npz_path=path, test_size=31)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"^name='mnist'") as info:
        data.load_dataset("mnist")
    assert all(name in str(info.value) for name in data.DATASET_NAMES)


# --------------------------------------------------------------------------------------
# digits and synthetic
# --------------------------------------------------------------------------------------


def test_digits():
    ds = data.load_dataset("digits")
    assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == 10
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    counts = np.bincount(ds.test_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    again = data.load_dataset("digits", seed=123)  # the split does not depend on seed
    np.testing.assert_array_equal(ds.test_images, again.test_images)
    sub = data.load_dataset("digits", train_size=100, test_size=50)
    assert sub.num_train == 100 and sub.num_test == 50


def test_synthetic_is_deterministic_and_learnable():
    kw = dict(synthetic_shape=(16, 16, 3), synthetic_train_size=200, synthetic_test_size=100)
    a = data.load_dataset("synthetic", seed=0, **kw)
    b = data.load_dataset("synthetic", seed=0, **kw)
    c = data.load_dataset("synthetic", seed=1, **kw)
    assert a.train_images.shape == (200, 16, 16, 3) and a.test_images.shape == (100, 16, 16, 3)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int32
    assert a.num_classes == 10 and len(a.mean) == 3
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    # Learnable: a nearest-class-mean classifier is nearly perfect.
    x_train = a.train_images.reshape(200, -1).astype(np.float64)
    x_test = a.test_images.reshape(100, -1).astype(np.float64)
    means = np.stack([x_train[a.train_labels == k].mean(0) for k in range(10)])
    pred = np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == a.test_labels).mean() > 0.9
    small = data.load_dataset("synthetic", synthetic_shape=(5, 7, 1), synthetic_num_classes=3)
    assert small.train_images.shape == (512, 5, 7, 1) and small.test_images.shape == (256, 5, 7, 1)
    assert set(np.unique(small.train_labels)) == {0, 1, 2}


# --------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------

N, H, W, C = 16, 8, 8, 3
PAD = 2


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (N, H, W, C), dtype=np.uint8)  # no zeros: padding shows
    labels = (np.arange(N) * 7 % 5).astype(np.int32)
    return images, labels


def _augment(images, labels, idx, step, mode, **kw):
    kw.setdefault("padding", PAD)
    out, lab = data.augment(
        jnp.asarray(images),
        jnp.asarray(labels),
        jnp.asarray(idx, jnp.int32),
        jnp.asarray(step, jnp.int32),
        key=jax.random.key(42),
        augmentation=mode,
        **kw,
    )
    return np.asarray(out), np.asarray(lab)


def _numpy_reference(images, idx, dy, dx, flipped, padding):
    out = []
    for v, y, x, f in zip(idx, dy, dx, flipped, strict=True):
        img = np.pad(images[v % len(images)], ((padding, padding), (padding, padding), (0, 0)))
        img = img[y : y + images.shape[1], x : x + images.shape[2]]
        out.append(img[:, ::-1] if f else img)
    return np.stack(out)


def test_none_is_identity(base):
    images, labels = base
    idx = np.array([3, 0, 15, 3, 7])
    out, lab = _augment(images, labels, idx, 5, "none")
    np.testing.assert_array_equal(out, images[idx])
    np.testing.assert_array_equal(lab, labels[idx])
    assert out.dtype == np.uint8
    assert data.virtual_size(N, "none", 3) == N


@pytest.mark.parametrize("mode", ["random", "fixed"])
def test_crop_flip_matches_numpy_reference(base, mode):
    images, labels = base
    rng = np.random.default_rng(1)
    idx = rng.permutation(N) if mode == "random" else rng.permutation(2 * N)[:N]
    step = jnp.int32(3)
    out, lab = _augment(images, labels, idx, step, mode, copies=2)
    dy, dx, flipped = (
        np.asarray(a)
        for a in data.augmentation_params(
            jax.random.key(42), step, jnp.asarray(idx), augmentation=mode, padding=PAD
        )
    )
    assert dy.dtype == np.int32 and flipped.dtype == np.bool_
    assert dy.min() >= 0 and dy.max() <= 2 * PAD and dx.min() >= 0 and dx.max() <= 2 * PAD
    assert flipped.any() and not flipped.all()
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 3
    np.testing.assert_array_equal(out, _numpy_reference(images, idx, dy, dx, flipped, PAD))
    np.testing.assert_array_equal(lab, labels[idx % N])
    assert out.dtype == np.uint8 and out.shape == (len(idx), H, W, C)


def test_offsets_and_flips_cover_their_range():
    dy, dx, flipped = data.augmentation_params(
        jax.random.PRNGKey(0), 0, jnp.arange(4000), augmentation="random", padding=4
    )
    assert set(np.unique(np.asarray(dy)).tolist()) == set(range(9))
    assert set(np.unique(np.asarray(dx)).tolist()) == set(range(9))
    assert 0.45 < float(np.mean(np.asarray(flipped))) < 0.55


@pytest.mark.parametrize("mode", ["random", "fixed"])
def test_view_does_not_depend_on_batch(base, mode):
    images, labels = base
    first, _ = _augment(images, labels, [5, 1, 2, 9], 7, mode)
    second, _ = _augment(images, labels, [11, 0, 5, 3], 7, mode)
    np.testing.assert_array_equal(first[0], second[2])
    # Splitting a batch (as across devices) gives the same views as the whole batch.
    idx = np.arange(N)
    whole, _ = _augment(images, labels, idx, 7, mode)
    halves = [_augment(images, labels, part, 7, mode)[0] for part in np.split(idx, 4)]
    np.testing.assert_array_equal(whole, np.concatenate(halves))


def test_random_changes_with_step_fixed_does_not(base):
    images, labels = base
    idx = np.arange(N)
    r1, _ = _augment(images, labels, idx, 1, "random")
    r2, _ = _augment(images, labels, idx, 2, "random")
    assert (r1 != r2).any(axis=(1, 2, 3)).sum() > N // 2
    f1, _ = _augment(images, labels, idx, 1, "fixed", copies=3)
    f2, _ = _augment(images, labels, idx, 2, "fixed", copies=3)
    np.testing.assert_array_equal(f1, f2)


def test_fixed_copies(base):
    images, labels = base
    copies = 3
    assert data.virtual_size(N, "fixed", copies) == N * copies
    assert data.virtual_size(N, "random", copies) == N
    idx = np.arange(N)
    views = [_augment(images, labels, idx + k * N, 0, "fixed", copies=copies) for k in range(3)]
    for _, lab in views:
        np.testing.assert_array_equal(lab, labels)
    # v and v + N show the same base image under (mostly) different crops/flips.
    assert (views[0][0] != views[1][0]).any(axis=(1, 2, 3)).sum() > N // 2
    assert (views[1][0] != views[2][0]).any(axis=(1, 2, 3)).sum() > N // 2
    ref = _augment(images, labels, idx, 0, "none")[0]
    for out, _ in views:  # each view is a shifted/flipped copy: its pixels come from ref
        for v in range(N):
            assert np.isin(out[v][out[v] != 0], ref[v]).all()


def test_zero_padding_is_visible(base):
    _, labels = base
    images = np.full((N, H, W, C), 255, np.uint8)  # same shapes as `base`: no new compile
    idx = np.arange(N) + N
    out, _ = _augment(images, labels, idx, 0, "fixed", copies=2)
    dy, dx, _ = data.augmentation_params(
        jax.random.key(42), jnp.int32(0), jnp.asarray(idx), augmentation="fixed", padding=PAD
    )
    dy, dx = np.asarray(dy), np.asarray(dx)
    for view, y, x in zip(out, dy, dx, strict=True):
        zero_rows = int((view == 0).all(axis=(1, 2)).sum())
        zero_cols = int((view == 0).all(axis=(0, 2)).sum())
        assert zero_rows == abs(int(y) - PAD) and zero_cols == abs(int(x) - PAD)
        assert set(np.unique(view).tolist()) <= {0, 255}
    assert (dy != PAD).any() and (dx != PAD).any()


def test_no_flip_no_padding_is_identity(base):
    images, labels = base
    idx = np.arange(N)
    out, _ = _augment(images, labels, idx, 4, "random", padding=0, flip=False)
    np.testing.assert_array_equal(out, images)
    out, _ = _augment(images, labels, idx, 4, "random", padding=0, flip=True)
    flipped = (out != images).any(axis=(1, 2, 3))
    np.testing.assert_array_equal(out[flipped], images[flipped][:, :, ::-1])
    assert flipped.any()


def test_augment_under_jit(base):
    images, labels = base
    fn = jax.jit(functools.partial(data.augment, augmentation="random", copies=1, padding=PAD))
    idx = jnp.arange(N, dtype=jnp.int32)
    jitted, lab = fn(
        jnp.asarray(images), jnp.asarray(labels), idx, jnp.int32(9), key=jax.random.key(42)
    )
    eager, _ = _augment(images, labels, idx, 9, "random")
    np.testing.assert_array_equal(np.asarray(jitted), eager)
    np.testing.assert_array_equal(np.asarray(lab), labels)


def test_augmentation_errors(base):
    images, labels = base
    with pytest.raises(ValueError, match=r"^augmentation='crop'"):
        _augment(images, labels, [0], 0, "crop")
    with pytest.raises(ValueError, match=r"^copies=0"):
        _augment(images, labels, [0], 0, "fixed", copies=0)
    with pytest.raises(ValueError, match=r"^augmentation="):
        data.virtual_size(N, "flip", 1)
    with pytest.raises(ValueError, match=r"^copies="):
        data.virtual_size(N, "fixed", 0)


def test_normalize():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = data.normalize(jnp.asarray(images), mean, std)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    expected = (images / 255.0 - np.array(mean)) / np.array(std)
    # float32: the float64 value rounded once, so within half a float32 ulp of it.
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2**-24, atol=0)
    half = data.normalize(jnp.asarray(images), mean, std, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), expected, rtol=2**-8, atol=0)


def test_float64_normalization_is_numpys_division_in_a_compiled_step(x64):
    """(x / 255 - mean) / std as numpy computes it, also inside jit (where XLA would rewrite
    the formula into multiplications by reciprocals and could fuse them into FMAs), and for
    a single-channel mean broadcast over the channels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    expected = (images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    compiled = jax.jit(lambda x: data.normalize(x, mean, std, jnp.float64))(images)
    assert compiled.dtype == jnp.float64
    # Same IEEE operations in the same order: equal up to the last bit; a tolerance of one
    # ulp keeps the check about the arithmetic, not about a particular libm or CPU.
    np.testing.assert_allclose(np.asarray(compiled), expected, rtol=2**-52, atol=0)
    gray = data.normalize(images[..., :1], (0.5,), (0.25,), jnp.float64)
    np.testing.assert_allclose(np.asarray(gray), (images[..., :1] / 255.0 - 0.5) / 0.25)
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(images.astype(np.float32), mean, std)


def test_inputs_come_in_the_models_precision():
    """float64 inputs for float64 models under x64 only; float32 for everything else,
    bfloat16 models included (they cast their float32 inputs on entry)."""
    assert data.input_dtype("float32") == np.float32
    assert data.input_dtype("bfloat16") == np.float32
    assert data.input_dtype(jnp.float16) == np.float32
    with jax.enable_x64(False):
        assert data.input_dtype("float64") == np.float32
    with jax.enable_x64(True):
        assert data.input_dtype("float64") == np.float64
        assert data.input_dtype("float32") == np.float32
