"""Data loaders (IDX, CIFAR pickles, TFDS), synthetic data, augmentation and batching."""

import gzip
import importlib.util
import pickle
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import data

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    blob = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(blob)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_on_generated_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (20,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (7,)),
    }
    for stem, arr in arrays.items():
        write_idx(tmp_path / (stem + (".gz" if gz else "")), arr, gz)
    ds = data.load("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_test.dtype == np.int32 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_allclose(ds.mean, [arrays["train-images-idx3-ubyte"].mean() / 255], rtol=1e-5)


def test_idx_rejects_bad_magic(tmp_path):
    (tmp_path / "f").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "f")


def _cifar_release(tmp_path: Path, archive: bool) -> dict:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    made = {}
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        (folder / name).write_bytes(pickle.dumps(d))
        made[name] = d
    if archive:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return made


@pytest.mark.parametrize("archive", [False, True])
def test_cifar_pickle_loader(tmp_path, archive):
    made = _cifar_release(tmp_path, archive)
    ds = data.load("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    # CHW-flat rows -> HWC images: pixel (row 0, col 1) of channel 2 is element 2*1024 + 1.
    first = made["data_batch_1"][b"data"][0]
    assert ds.x_train[0, 0, 1, 2] == first[2 * 1024 + 1]
    np.testing.assert_array_equal(ds.y_test, made["test_batch"][b"labels"])
    assert ds.num_classes == 10 and ds.mean.shape == (3,)


def test_tfds_read_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("cifar10", data_dir=None)
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10


@pytest.mark.skipif(
    not FMNIST_DIR.is_dir(),
    reason="Debian package dataset-fashion-mnist "
    "not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    ds = data.load("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


def test_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")
    with pytest.raises(FileNotFoundError, match="'/nonexistent-dir' does not exist.*cifar-10-py"):
        data.load("cifar10", data_dir="/nonexistent-dir")
    # A misspelt data_dir must not fall back to the default Fashion-MNIST copy.
    with pytest.raises(FileNotFoundError, match="'/usr/share/datasets/fashion-mnis' does not"):
        data.load("fashion_mnist", data_dir="/usr/share/datasets/fashion-mnis")
    with pytest.raises(ValueError, match="num_train"):
        data.synthetic(num_train=8).subset(num_train=9)


def test_synthetic_is_seeded_and_learnable():
    a, b = data.synthetic(seed=3), data.synthetic(seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, data.synthetic(seed=4).x_train)
    ds = data.synthetic(num_train=2000, num_test=500, shape=(12, 12, 3), num_classes=5)
    assert ds.x_train.shape == (2000, 12, 12, 3) and set(np.unique(ds.y_train)) == set(range(5))
    # Nearest-class-mean classifier on raw pixels is well above chance (20 %).
    x = ds.x_train.reshape(2000, -1).astype(float)
    means = np.stack([x[ds.y_train == k].mean(0) for k in range(5)])
    xt = ds.x_test.reshape(500, -1).astype(float)
    pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == ds.y_test).mean() > 0.6


def test_augment_properties():
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 10, 10, 3))
    key = jax.random.PRNGKey(1)
    for mode in ("edge", "reflect", "constant"):
        out = jax.jit(lambda k, x, mode=mode: data.augment(k, x, pad_mode=mode))(key, x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # No crop + flip: each image is either itself or its mirror; flipping is an involution.
    out = data.augment(key, x, crop_padding=0, flip=True)
    for o, i in zip(out, x):
        assert jnp.array_equal(o, i) or jnp.array_equal(o, i[:, ::-1])
    assert jnp.array_equal(x[:, :, ::-1][:, :, ::-1], x)
    # The crop is a translation: the centre of a crop of padding 1 is a shifted window of x.
    out = data.augment(key, x, crop_padding=1, flip=False)
    for o, i in zip(out, x):
        hits = [
            jnp.allclose(o[2:-2, 2:-2], i[2 + dy : 8 + dy, 2 + dx : 8 + dx])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        assert any(hits)
    with pytest.raises(ValueError, match="pad_mode"):
        data.augment(key, x, pad_mode="wrap")


def test_batches_deterministic_and_resumable():
    x, y = np.arange(50)[:, None], np.arange(50)
    a = [b[1] for b in data.batches(x, y, 8, seed=0, epoch=2)]
    b = [b[1] for b in data.batches(x, y, 8, seed=0, epoch=2)]
    assert len(a) == 6 and all(np.array_equal(p, q) for p, q in zip(a, b))
    tail = [b[1] for b in data.batches(x, y, 8, seed=0, epoch=2, start=4)]
    assert all(np.array_equal(p, q) for p, q in zip(a[4:], tail))
    assert not np.array_equal(a[0], next(data.batches(x, y, 8, seed=0, epoch=3))[1])
    assert len(np.unique(np.concatenate(a))) == 48  # a permutation, no repeats


def _find_spec_with_tensorflow(real):
    return lambda name, *a: object() if name == "tensorflow" else real(name, *a)


def test_tfds_read_error_is_shown_not_swallowed(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    def broken(*args, **kwargs):
        raise RuntimeError("array_record file is corrupt")

    monkeypatch.setattr(tfds, "data_source", broken)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with pytest.raises(FileNotFoundError, match="RuntimeError: array_record file is corrupt"):
        data.load("cifar10", data_dir=tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_tfds_not_prepared_without_tensorflow_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared, and TensorFlow"):
        data.load("cifar10", data_dir=tmp_path)


def test_tfds_prepares_with_tensorflow_and_shows_its_error(monkeypatch, tmp_path):
    # With TensorFlow (Colab) an unprepared dataset is prepared as array_record; a failure of
    # the preparation (here: no internet) reaches the user's error message.
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def prepare(self, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("no internet")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
    monkeypatch.setattr(
        importlib.util, "find_spec", _find_spec_with_tensorflow(importlib.util.find_spec)
    )
    with pytest.raises(FileNotFoundError, match="preparing TFDS 'cifar10' failed: ConnectionError"):
        data.load("cifar10", data_dir=tmp_path)
    assert calls == [{"file_format": "array_record"}]


def test_tfds_array_record_dataset_written_locally_is_read_without_tensorflow(tmp_path):
    """A real TFDS fashion_mnist layout (array_record, PNG-encoded images), written here from
    generated data, is read back by `data.load` through `tfds.data_source`, with no TensorFlow.

    The writer is the registered FashionMNIST builder with its download replaced by generated
    PIL images (PIL encodes the PNGs; TFDS' own numpy-array encoder would need TensorFlow).
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    made = {
        split: (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), np.arange(n) % 10)
        for split, n in (("train", 30), ("test", 12))
    }

    class Generated(tfds.image_classification.FashionMNIST, skip_registration=True):
        name = "fashion_mnist"

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in made}

        def _generate_examples(self, split):
            for i, (img, label) in enumerate(zip(*made[split])):
                yield i, {"image": pil.fromarray(img[..., 0], mode="L"), "label": int(label)}

    Generated(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert list((tmp_path / "fashion_mnist").glob("*/fashion_mnist-train.array_record*"))
    ds = data.load("fashion_mnist", data_dir=tmp_path)
    for split, (x, y) in (("train", (ds.x_train, ds.y_train)), ("test", (ds.x_test, ds.y_test))):
        want_x, want_y = made[split]
        assert x.shape == want_x.shape and x.dtype == np.uint8
        # TFDS shuffles records: compare as a set of (image bytes, label) pairs, pixel-exact.
        assert sorted(zip(map(bytes, x), y.tolist())) == sorted(
            zip(map(bytes, want_x), want_y.tolist())
        )
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules
