"""Datasets as uint8 NumPy arrays, on-device augmentation, and a seeded batch iterator."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic")

# Where MNIST-format IDX files are looked for when no data_dir is given.
IDX_SEARCH_PATHS = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}
GET_COMMAND = {
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist   (Debian; files land in "
    "/usr/share/datasets/fashion-mnist), or prepare TFDS 'fashion_mnist' with "
    "pip install 'eqrobust[tf]' && python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('fashion_mnist').download_and_prepare(file_format='array_record')\"",
    "mnist": "download the four MNIST IDX files into a folder and pass --data_dir, or prepare TFDS "
    "'mnist' (pip install 'eqrobust[tf]')",
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into DATA_DIR "
    "(archive or extracted), or prepare TFDS 'cifar10' with pip install 'eqrobust[tf]' && "
    'python -c "import tensorflow_datasets as tfds; '
    "tfds.builder('cifar10').download_and_prepare(file_format='array_record')\"",
    "cifar100": "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into DATA_DIR "
    "(archive or extracted), or prepare TFDS 'cifar100' with pip install 'eqrobust[tf]'",
}


class Dataset(NamedTuple):
    """A classification dataset held in memory.

    Attributes:
        name: dataset name.
        x_train: [N, H, W, C] uint8 images.
        y_train: [N] int32 labels.
        x_test: [M, H, W, C] uint8 images.
        y_test: [M] int32 labels.
        num_classes: number of classes K.
        mean: [C] float32 per-channel mean of the training images, in [0, 1] units.
        std: [C] float32 per-channel standard deviation, in [0, 1] units.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def subset(self, num_train: int | None = None, num_test: int | None = None) -> Dataset:
        """The first `num_train` / `num_test` examples (None keeps all); mean/std unchanged."""
        for n, total, what in (
            (num_train, len(self.x_train), "num_train"),
            (num_test, len(self.x_test), "num_test"),
        ):
            if n is not None and not 0 < n <= total:
                raise ValueError(f"{what}={n} must be in 1..{total} for dataset {self.name!r}")
        return self._replace(
            x_train=self.x_train[:num_train],
            y_train=self.y_train[:num_train],
            x_test=self.x_test[:num_test],
            y_test=self.y_test[:num_test],
        )


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xf = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return xf.mean(0).astype(np.float32), xf.std(0).astype(np.float32)


def _make(name: str, xtr, ytr, xte, yte, num_classes: int) -> Dataset:
    xtr, xte = np.ascontiguousarray(xtr, np.uint8), np.ascontiguousarray(xte, np.uint8)
    if xtr.ndim == 3:
        xtr, xte = xtr[..., None], xte[..., None]
    mean, std = _stats(xtr)
    return Dataset(
        name, xtr, np.asarray(ytr, np.int32), xte, np.asarray(yte, np.int32), num_classes, mean, std
    )


# ----------------------------------------------------------------------------- IDX (MNIST format)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into a NumPy array of its stored dtype."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} elements")
    return arr.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        for sep in ("-", "."):  # both 'train-images-idx3-ubyte' and 'train-images.idx3-ubyte' exist
            p = folder / (stem.replace("-idx", sep + "idx") + suffix)
            if p.exists():
                return p
    return None


def _load_idx_folder(name: str, folder: Path) -> Dataset | None:
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    paths = [_find_idx(folder, s) for s in stems]
    if any(p is None for p in paths):
        return None
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    return _make(name, xtr, ytr, xte, yte, 10)


# ----------------------------------------------------------------------------- CIFAR pickles


def _unpickle(blob: bytes) -> dict:
    return pickle.loads(blob, encoding="bytes")


def _cifar_arrays(d: dict, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(d[label_key], np.int32)


def _load_cifar_pickles(name: str, data_dir: Path) -> Dataset | None:
    """Reads the official python-pickle release, extracted or as the .tar.gz archive."""
    folder_name = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, k = ["test_batch"], b"labels", 10
    else:
        train_files, test_files, label_key, k = ["train"], ["test"], b"fine_labels", 100

    def read_all(get: Any) -> Dataset:
        parts = {}
        for split, files in (("train", train_files), ("test", test_files)):
            xs, ys = zip(*(_cifar_arrays(_unpickle(get(f)), label_key) for f in files))
            parts[split] = (np.concatenate(xs), np.concatenate(ys))
        return _make(name, *parts["train"], *parts["test"], k)

    for folder in (data_dir / folder_name, data_dir):
        if all((folder / f).exists() for f in train_files + test_files):
            return read_all(lambda f, folder=folder: (folder / f).read_bytes())
    archive = (
        data_dir
        / {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    )
    if archive.exists():
        with tarfile.open(archive, "r:gz") as tar:
            return read_all(lambda f: tar.extractfile(f"{folder_name}/{f}").read())
    return None


# ----------------------------------------------------------------------------- TFDS


def _read_tfds(tfds: Any, name: str, data_dir: str | None) -> Dataset:
    """Reads both splits of a prepared TFDS dataset (array_record files) with `tfds.data_source`."""
    info = tfds.builder(name, data_dir=data_dir).info
    splits = {}
    for split in ("train", "test"):
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        n = len(src)
        x = np.empty((n, *info.features["image"].shape), np.uint8)
        y = np.empty((n,), np.int32)
        for i in range(n):  # random-access array_record reads; fine for CIFAR-sized sets
            ex = src[i]
            x[i], y[i] = ex["image"], ex["label"]
        splits[split] = (x, y)
    return _make(name, *splits["train"], *splits["test"], info.features["label"].num_classes)


def _load_tfds(name: str, data_dir: str | None, problems: list[str]) -> Dataset | None:
    """A TFDS dataset, read without TensorFlow; prepared first when needed and possible.

    Reads prepared array_record files with `tfds.data_source`. When the dataset is not prepared
    and TensorFlow is installed (Colab), prepares it with
    `tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format="array_record")`
    (downloads) and reads it. Every failure is appended to `problems` with its error message,
    so that the caller's error shows it instead of a bare "not found".
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        problems.append(f"tensorflow_datasets is not importable ({e})")
        return None
    try:
        return _read_tfds(tfds, name, data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; shown to the user below
        read_error = f"{type(e).__name__}: {e}"
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception as e:  # noqa: BLE001
        problems.append(f"TFDS '{name}': {type(e).__name__}: {e}")
        return None
    if prepared:
        problems.append(f"TFDS '{name}' is prepared but could not be read: {read_error}")
        return None
    if importlib.util.find_spec("tensorflow") is None:
        problems.append(
            f"TFDS '{name}' is not prepared, and TensorFlow (needed to prepare it) is not "
            "installed: pip install 'eqrobust[tf]'"
        )
        return None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare(file_format="array_record")
        return _read_tfds(tfds, name, data_dir)
    except Exception as e:  # noqa: BLE001
        problems.append(f"preparing TFDS '{name}' failed: {type(e).__name__}: {e}")
        return None


# ----------------------------------------------------------------------------- synthetic


def synthetic(
    *,
    num_train: int = 1024,
    num_test: int = 256,
    shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 0.15,
) -> Dataset:
    """A learnable procedurally generated dataset.

    Each class has a smooth random prototype image; an example is its class prototype, shifted by
    up to 2 pixels, scaled in contrast, plus pixel noise. Linear models reach well above chance,
    small CNNs near 100 %.
    """
    h, w, c = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    # Smooth prototypes: low-frequency random fields (sum of a few random cosines).
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    protos = np.zeros((num_classes, h, w, c))
    for k in range(num_classes):
        for ch in range(c):
            for _ in range(4):
                fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
                protos[k, :, :, ch] += np.cos(2 * np.pi * (fx * xx + fy * yy) + ph)
    protos = (protos - protos.min()) / (protos.max() - protos.min())

    def sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, n).astype(np.int32)
        x = protos[y]
        shifts = rng.integers(-2, 3, (n, 2))
        x = np.stack([np.roll(xi, tuple(s), axis=(0, 1)) for xi, s in zip(x, shifts)])
        x = 0.5 + (x - 0.5) * rng.uniform(0.6, 1.0, (n, 1, 1, 1))
        x = x + noise * rng.standard_normal(x.shape)
        return np.clip(np.round(x * 255), 0, 255).astype(np.uint8), y

    xtr, ytr = sample(num_train, rng)
    xte, yte = sample(num_test, np.random.default_rng(seed + 1_000_003))
    return _make("synthetic", xtr, ytr, xte, yte, num_classes)


# ----------------------------------------------------------------------------- public loader


def load(name: str, *, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Dataset:
    """Loads a dataset as uint8 arrays.

    Args:
        name: one of `DATASETS`.
        data_dir: a folder with IDX files (MNIST family), the CIFAR python-pickle release (archive
            or extracted), or a TFDS data dir; it must exist, and it is the only place searched.
            None searches the default places.
            Last resort, a TFDS dataset (array_record files, read without TensorFlow); when it is
            not prepared and TensorFlow is installed (Colab), it is prepared first (downloads).
        **kwargs: options of `synthetic` when name == "synthetic".

    Returns:
        The `Dataset`.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the data is not on this machine; the message says where it looked and
            the command that gets it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "synthetic":
        return synthetic(**kwargs)
    if kwargs:
        raise ValueError(f"dataset {name!r} takes no options, got {sorted(kwargs)}")
    if data_dir and not Path(data_dir).is_dir():
        # A misspelt path must not fall back to the default copy of some dataset.
        raise FileNotFoundError(
            f"data_dir {str(data_dir)!r} does not exist (or is not a folder); dataset {name!r} "
            "was not loaded. Fix the path, or create the folder first if TFDS should prepare the "
            f"dataset into it. To get it: {GET_COMMAND[name]}"
        )
    looked: list[str] = []
    if name in IDX_SEARCH_PATHS:
        # An explicit data_dir is the only place searched: no fallback to the default copies.
        folders = [Path(data_dir)] if data_dir else [Path(p) for p in IDX_SEARCH_PATHS[name]]
        for folder in folders:
            looked.append(f"IDX files in {folder}")
            if folder.is_dir() and (ds := _load_idx_folder(name, folder)) is not None:
                return ds
    else:
        if data_dir:
            looked.append(f"CIFAR python pickles (archive or extracted) in {data_dir}")
            if Path(data_dir).is_dir() and (ds := _load_cifar_pickles(name, Path(data_dir))):
                return ds
    tfds_dir = str(data_dir) if data_dir else None
    looked.append(f"TFDS '{name}' in {tfds_dir or 'the default TFDS data dir'}")
    problems: list[str] = []
    if (ds := _load_tfds(name, tfds_dir, problems)) is not None:
        return ds
    raise FileNotFoundError(
        f"dataset {name!r} not found. Looked for: "
        + "; ".join(looked)
        + ". TFDS: "
        + "; ".join(problems)
        + f". To get it: {GET_COMMAND[name]}"
    )


# ----------------------------------------------------------------------------- arrays, batches


def to_float(x: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [..., H, W, C] -> float32 in [0, 1]."""
    return jnp.asarray(x, jnp.float32) / 255.0


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = True,
    start: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled batches; the order depends only on (seed, epoch), so a resumed run sees the same.

    Args:
        x: [N, ...] array. y: [N] array.
        batch_size: examples per batch.
        seed, epoch: determine the permutation.
        drop_last: drop the final partial batch.
        start: index of the first batch to yield (to resume mid-epoch).
    """
    n = len(x)
    if batch_size <= 0 or (drop_last and batch_size > n):
        raise ValueError(f"batch_size={batch_size} must be in 1..{n} (dataset size)")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(start * batch_size, stop, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


def _pad(x: jax.Array, p: int, mode: str) -> jax.Array:
    return jnp.pad(x, ((p, p), (p, p), (0, 0)), mode=mode)


def augment(
    key: jax.Array,
    x: jax.Array,
    *,
    crop_padding: int = 4,
    pad_mode: str = "edge",
    flip: bool = True,
) -> jax.Array:
    """Random crop after padding and random horizontal flip, per example.

    Args:
        key: PRNG key.
        x: [B, H, W, C] float images.
        crop_padding: pixels of padding before the random crop (0 disables cropping).
        pad_mode: "edge", "reflect", or "constant" (zeros).
        flip: random horizontal flips.

    Returns:
        [B, H, W, C] augmented images, same dtype.
    """
    if pad_mode not in ("edge", "reflect", "constant"):
        raise ValueError(f"pad_mode must be 'edge', 'reflect' or 'constant', got {pad_mode!r}")
    b, h, w, c = x.shape
    keys = jax.random.split(key, b)

    def one(k: jax.Array, img: jax.Array) -> jax.Array:
        k_crop, k_flip = jax.random.split(k)
        if crop_padding > 0:
            off = jax.random.randint(k_crop, (2,), 0, 2 * crop_padding + 1)
            img = jax.lax.dynamic_slice(
                _pad(img, crop_padding, pad_mode), (off[0], off[1], 0), (h, w, c)
            )
        if flip:
            img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
        return img

    return jax.vmap(one)(keys, x)
