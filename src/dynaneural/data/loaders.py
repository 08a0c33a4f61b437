"""Dataset loaders returning ``DatasetSplits``, the CIFAR-10 decode cache and the ``load_dataset`` registry."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynaneural.data.checksums import DataIntegrityError, missing_file_error, verify_file
from dynaneural.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_cifar10_archive, read_idx
from dynaneural.data.fsdd import load_fsdd
from dynaneural.data.sources import FILES, resolve_cache_dir, resolve_data_dir
from dynaneural.data.splits import DatasetSplits, stratified_split

#: Per-channel (mean, std) on the 0..1 scale, applied to every split (train-set statistics).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS_TEST_SIZE = 360  # fixed, seed-independent test split of the 1797 digits (20 %)
_CACHE_VERSION = 1


def _to_float(images: np.ndarray, *, scale: float, name: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, divided by ``scale`` then normalized with ``NORMALIZATION[name]``."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in NORMALIZATION[name])
    x = torch.from_numpy(images.astype(np.float32))  # a fresh, writable copy
    return x.div_(scale).sub_(mean).div_(std)


def _make_splits(
    name: str, *, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], scale: float,
    classes: tuple[str, ...], seed: int, val_size: int, train_limit: int | None,
) -> DatasetSplits:
    """Carve a stratified validation split out of ``train``, optionally subsample the rest, convert to tensors."""
    (train_x, train_y), (test_x, test_y) = train, test
    if not isinstance(val_size, int) or not 0 <= val_size < len(train_y):
        raise ValueError(f"val_size must be an int in [0, {len(train_y)}) for {name}, got {val_size!r}")
    if train_limit is not None and (not isinstance(train_limit, int) or train_limit < 1):
        raise ValueError(f"train_limit must be a positive int or None, got {train_limit!r}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = stratified_split(train_y, n_holdout=val_size, rng=rng)
    if train_limit is not None and train_limit < len(train_idx):
        train_idx = train_idx[stratified_split(train_y[train_idx], n_holdout=train_limit, rng=rng)[1]]
    return DatasetSplits(
        name=name,
        train_x=_to_float(train_x[train_idx], scale=scale, name=name),
        train_y=torch.from_numpy(train_y[train_idx].astype(np.int64)),
        val_x=_to_float(train_x[val_idx], scale=scale, name=name),
        val_y=torch.from_numpy(train_y[val_idx].astype(np.int64)),
        test_x=_to_float(test_x, scale=scale, name=name),
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        num_classes=len(classes),
        input_shape=tuple(int(d) for d in train_x.shape[1:]),  # type: ignore[arg-type]
        classes=classes,
    )


def load_digits(*, seed: int = 0, val_size: int = 360, train_limit: int | None = None) -> DatasetSplits:
    """Load scikit-learn's 8x8 digits (1797 images, no files needed) as ``(1, 8, 8)`` tensors.

    The test split (360 images, stratified) is fixed for every seed; the validation split is drawn from the remaining
    1437 images with ``seed``. Pixels 0..16 are scaled by 1/16, then normalized.

    Args:
        seed: Seed of the validation split and of the ``train_limit`` subsample.
        val_size: Validation images held out of the training pool.
        train_limit: Keep at most this many training images (stratified, deterministic), for quick runs.

    Returns:
        The splits (default sizes: 1077 train, 360 val, 360 test).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images, labels = bunch.images.astype(np.uint8)[:, None], bunch.target.astype(np.int64)
    pool, test = stratified_split(labels, n_holdout=DIGITS_TEST_SIZE, rng=np.random.default_rng(0))
    return _make_splits("digits", train=(images[pool], labels[pool]), test=(images[test], labels[test]), scale=16.0,
                        classes=DIGIT_CLASSES, seed=seed, val_size=val_size, train_limit=train_limit)


def _load_idx_dataset(name: str, *, data_dir: str | Path | None) -> tuple[np.ndarray, ...]:
    """md5-check and parse the four idx files of ``name``; return (train_x, train_y, test_x, test_y), images NCHW."""
    folder = resolve_data_dir(data_dir) / name
    table = FILES[name]
    arrays = []
    for split, count in (("train", 60000), ("t10k", 10000)):
        files = {kind: folder / f"{split}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")}
        for path in files.values():
            verify_file(path, expected=table[path.name], name=name)
        images = read_idx(files["images-idx3"], expected_magic=IDX_IMAGES_MAGIC)
        labels = read_idx(files["labels-idx1"], expected_magic=IDX_LABELS_MAGIC)
        if images.shape != (count, 28, 28) or labels.shape != (count,) or labels.max() > 9:
            raise DataIntegrityError(f"{name}: {split} files hold images {images.shape} and labels {labels.shape}, "
                                     f"expected ({count}, 28, 28) and ({count},) with labels 0..9")
        arrays += [images[:, None], labels]
    return tuple(arrays)


def load_mnist(
    *, data_dir: str | Path | None = None, seed: int = 0, val_size: int = 5000, train_limit: int | None = None
) -> DatasetSplits:
    """Load MNIST from ``<data_dir>/mnist/`` (md5-checked idx gz files) as ``(1, 28, 28)`` tensors.

    Args:
        data_dir: Data folder (argument, else ``$DYNANEURAL_DATA``, else ``~/.cache/dynaneural/data``).
        seed: Seed of the validation split and of the ``train_limit`` subsample.
        val_size: Validation images held out of the 60k training set (stratified).
        train_limit: Keep at most this many training images (stratified, deterministic), for quick runs.

    Returns:
        The splits; test is the official 10k test set.

    Raises:
        FileNotFoundError: A file is missing. DataIntegrityError: a file fails its md5 or has a bad header.
    """
    train_x, train_y, test_x, test_y = _load_idx_dataset("mnist", data_dir=data_dir)
    return _make_splits("mnist", train=(train_x, train_y), test=(test_x, test_y), scale=255.0,
                        classes=DIGIT_CLASSES, seed=seed, val_size=val_size, train_limit=train_limit)


def load_fashion_mnist(
    *, data_dir: str | Path | None = None, seed: int = 0, val_size: int = 5000, train_limit: int | None = None
) -> DatasetSplits:
    """Load Fashion-MNIST from ``<data_dir>/fashion-mnist/``; same arguments and errors as ``load_mnist``."""
    train_x, train_y, test_x, test_y = _load_idx_dataset("fashion-mnist", data_dir=data_dir)
    return _make_splits("fashion-mnist", train=(train_x, train_y), test=(test_x, test_y), scale=255.0,
                        classes=FASHION_MNIST_CLASSES, seed=seed, val_size=val_size, train_limit=train_limit)


def _cifar_arrays(archive: Path, md5: str, *, cache_dir: Path | None) -> tuple[np.ndarray, ...]:
    """Decoded CIFAR-10 uint8 arrays, from ``cache_dir/cifar10-v1-<md5>.npz`` when valid, else from the archive."""
    keys = ("train_x", "train_y", "test_x", "test_y")
    cache = None if cache_dir is None else cache_dir / f"cifar10-v{_CACHE_VERSION}-{md5}.npz"
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                arrays = tuple(npz[k] for k in keys)
            if arrays[0].shape[1:] == (3, 32, 32) and arrays[0].dtype == np.uint8 and len(arrays[0]) == len(arrays[1]):
                return arrays
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # unreadable cache: decode again and overwrite it
    arrays = read_cifar10_archive(archive)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **dict(zip(keys, arrays, strict=True)))
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, cache)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return arrays


def load_cifar10(
    *, data_dir: str | Path | None = None, seed: int = 0, val_size: int = 5000, train_limit: int | None = None,
    cache_dir: str | Path | None = None, use_cache: bool = True,
) -> DatasetSplits:
    """Load CIFAR-10 from ``<data_dir>/cifar10/`` (official ``.tar.gz`` or rebuilt ``.tar.xz``) as ``(3, 32, 32)``.

    The archive is md5-checked on every call. Its decoded uint8 arrays are cached as ``cifar10-v1-<md5>.npz`` in the
    cache folder, so a changed archive never reuses a stale cache; the cache is written atomically.

    Args:
        data_dir: Data folder (argument, else ``$DYNANEURAL_DATA``, else ``~/.cache/dynaneural/data``).
        seed: Seed of the validation split and of the ``train_limit`` subsample.
        val_size: Validation images held out of the 50k training set (stratified).
        train_limit: Keep at most this many training images (stratified, deterministic), for quick runs.
        cache_dir: Cache folder (argument, else ``$DYNANEURAL_CACHE``, else ``~/.cache/dynaneural``).
        use_cache: Read and write the decode cache.

    Returns:
        The splits; test is the official 10k test batch.

    Raises:
        FileNotFoundError: No archive. DataIntegrityError: the archive fails its md5 or holds malformed batches.
    """
    folder = resolve_data_dir(data_dir) / "cifar10"
    table = FILES["cifar10"]
    present = [folder / f for f in table if (folder / f).is_file()]
    if not present:
        raise missing_file_error([folder / f for f in table], name="cifar10")
    archive = present[0]
    md5 = verify_file(archive, expected=table[archive.name], name="cifar10")
    train_x, train_y, test_x, test_y = _cifar_arrays(
        archive, md5, cache_dir=resolve_cache_dir(cache_dir) if use_cache else None
    )
    return _make_splits("cifar10", train=(train_x, train_y), test=(test_x, test_y), scale=255.0,
                        classes=CIFAR10_CLASSES, seed=seed, val_size=val_size, train_limit=train_limit)


def _load_parity(**kwargs: object) -> DatasetSplits:
    # Generated in memory (ACT's parity task); imported lazily, the generator lives with the halting methods.
    from dynaneural.sample_wise.halting.parity import load_parity

    return load_parity(**kwargs)  # type: ignore[arg-type]


def _load_sst2(**kwargs: object) -> DatasetSplits:
    # Token ids, not images: returns dynaneural.data.sst2.TextSplits (same split attributes, int64 inputs).
    from dynaneural.data.sst2 import load_sst2

    return load_sst2(**kwargs)  # type: ignore[arg-type, return-value]


_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "parity": _load_parity,
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "fsdd": load_fsdd,
    "sst2": _load_sst2,
}


def list_datasets() -> tuple[str, ...]:
    """Names accepted by ``load_dataset``."""
    return tuple(_LOADERS)


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, seed: int = 0, val_size: int | None = None,
    train_limit: int | None = None,
) -> DatasetSplits:
    """Load a dataset by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``).

    Args:
        name: Dataset name (``_`` is accepted for ``-``, case-insensitive).
        data_dir: Data folder for file-based datasets (ignored by ``digits``).
        seed: Seed of the validation split and of the ``train_limit`` subsample.
        val_size: Validation size; ``None`` uses the dataset's default (360 digits, 5000 otherwise).
        train_limit: Keep at most this many training samples, for quick runs.

    Returns:
        The dataset's ``DatasetSplits``.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
    """
    key = name.strip().lower().replace("_", "-")
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_LOADERS)}")
    kwargs: dict[str, object] = {"seed": seed, "train_limit": train_limit}
    if val_size is not None:
        kwargs["val_size"] = val_size
    if key != "digits":
        kwargs["data_dir"] = data_dir
    return _LOADERS[key](**kwargs)
