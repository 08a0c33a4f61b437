"""Loaders, splits and registry of dynaneural.data (digits always; MNIST, Fashion-MNIST, CIFAR-10 when present)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaneural.data import (
    NORMALIZATION,
    DatasetSplits,
    list_datasets,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    resolve_cache_dir,
    resolve_data_dir,
    stratified_split,
)

MNIST_FILES = [f"mnist/{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
FASHION_FILES = [f.replace("mnist/", "fashion-mnist/") for f in MNIST_FILES]


def _to_uint8(x: torch.Tensor, name: str, scale: float) -> np.ndarray:
    """Undo the normalization of a split and return the original integer pixels."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[name])
    return torch.round((x * std + mean) * scale).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_digits(seed=0)


def test_digits_shapes_and_normalization(digits: DatasetSplits) -> None:
    assert digits.name == "digits" and digits.sizes == {"train": 1077, "val": 360, "test": 360}
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and digits.classes[3] == "3"
    for x, y in ((digits.train_x, digits.train_y), (digits.val_x, digits.val_y), (digits.test_x, digits.test_y)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
    assert abs(digits.train_x.mean().item()) < 0.05 and abs(digits.train_x.std().item() - 1) < 0.05
    assert torch.bincount(digits.test_y).min() >= 35  # stratified: ~36 per class


def test_digits_splits_partition_the_dataset(digits: DatasetSplits) -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    rows = Counter(r.tobytes() + bytes([y]) for r, y in zip(bunch.images.astype(np.uint8), bunch.target, strict=True))
    got = Counter()
    for x, y in ((digits.train_x, digits.train_y), (digits.val_x, digits.val_y), (digits.test_x, digits.test_y)):
        got.update(r[0].tobytes() + bytes([int(t)]) for r, t in zip(_to_uint8(x, "digits", 16.0), y, strict=True))
    assert got == rows  # every image exactly once across the three splits


def test_digits_deterministic_given_seed(digits: DatasetSplits) -> None:
    again, other = load_digits(seed=0), load_digits(seed=1)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(digits, field), getattr(again, field))
    assert not torch.equal(digits.val_x, other.val_x)
    assert torch.equal(digits.test_x, other.test_x)  # the test split does not move with the seed


def test_train_limit_and_val_size(digits: DatasetSplits) -> None:
    small = load_digits(seed=0, train_limit=100)
    assert small.sizes == {"train": 100, "val": 360, "test": 360}
    assert torch.equal(small.val_x, digits.val_x)  # subsampling does not change the validation split
    assert torch.bincount(small.train_y).tolist() == [10] * 10
    assert torch.equal(small.train_x, load_digits(seed=0, train_limit=100).train_x)
    assert load_digits(val_size=0, train_limit=10_000).sizes == {"train": 1437, "val": 0, "test": 360}
    with pytest.raises(ValueError, match="val_size"):
        load_digits(val_size=1437)
    with pytest.raises(ValueError, match="train_limit"):
        load_digits(train_limit=0)


def test_stratified_split_is_an_exact_stratified_partition() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    kept, held = stratified_split(labels, n_holdout=10, rng=np.random.default_rng(0))
    assert len(held) == 10 and np.bincount(labels[held]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100))
    again = stratified_split(labels, n_holdout=10, rng=np.random.default_rng(0))
    assert np.array_equal(again[1], held)


def test_dataset_splits_validates_its_fields(digits: DatasetSplits) -> None:
    fields = {f: getattr(digits, f) for f in ("name", "train_x", "train_y", "val_x", "val_y", "test_x", "test_y",
                                              "num_classes", "input_shape", "classes")}
    with pytest.raises(ValueError, match="train_x must be a float32"):
        DatasetSplits(**{**fields, "train_x": digits.train_x.double()})
    with pytest.raises(ValueError, match="val_y must be an int64"):
        DatasetSplits(**{**fields, "val_y": digits.val_y[:-1]})
    with pytest.raises(ValueError, match="num_classes"):
        DatasetSplits(**{**fields, "num_classes": 9})
    with pytest.raises(ValueError, match="input_shape"):
        DatasetSplits(**{**fields, "input_shape": (8, 8)})


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "fsdd", "sst2", "parity"} <= set(list_datasets())
    with pytest.raises(ValueError, match="digits, mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
    assert load_dataset("Digits", val_size=100, train_limit=50).sizes == {"train": 50, "val": 100, "test": 360}


def test_resolve_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DYNANEURAL_DATA", raising=False)
    monkeypatch.delenv("DYNANEURAL_CACHE", raising=False)
    assert resolve_data_dir(None) == Path.home() / ".cache" / "dynaneural" / "data"
    assert resolve_cache_dir(None) == Path.home() / ".cache" / "dynaneural"
    monkeypatch.setenv("DYNANEURAL_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("DYNANEURAL_CACHE", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "env" and resolve_cache_dir() == tmp_path / "cache"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"


@pytest.fixture(scope="module")
def mnist(require_real) -> DatasetSplits:
    return load_mnist(data_dir=require_real(*MNIST_FILES), seed=0)


def test_mnist_real(mnist: DatasetSplits) -> None:
    assert mnist.sizes == {"train": 55000, "val": 5000, "test": 10000} and mnist.input_shape == (1, 28, 28)
    assert torch.bincount(mnist.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_counts = torch.bincount(mnist.train_y, minlength=10) + torch.bincount(mnist.val_y, minlength=10)
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(mnist.train_x.mean().item()) < 0.01 and abs(mnist.train_x.std().item() - 1) < 0.01


def test_mnist_via_registry_env_and_train_limit(require_real, monkeypatch: pytest.MonkeyPatch,
                                                mnist: DatasetSplits) -> None:
    monkeypatch.setenv("DYNANEURAL_DATA", str(require_real(*MNIST_FILES)))
    small = load_dataset("mnist", seed=0, train_limit=1000)
    assert small.sizes == {"train": 1000, "val": 5000, "test": 10000}
    assert torch.equal(small.val_y, mnist.val_y) and torch.equal(small.test_x, mnist.test_x)


def test_fashion_mnist_real(require_real) -> None:
    splits = load_fashion_mnist(data_dir=require_real(*FASHION_FILES), val_size=1000, train_limit=2000)
    assert splits.sizes == {"train": 2000, "val": 1000, "test": 10000} and splits.classes[-1] == "Ankle boot"
    assert torch.bincount(splits.test_y).tolist() == [1000] * 10
    assert torch.bincount(splits.val_y).tolist() == [100] * 10


@pytest.mark.slow
def test_cifar10_real_archive(require_real, tmp_path: Path) -> None:
    data_dir = require_real("cifar10/cifar-10-python.tar.xz")
    full = load_cifar10(data_dir=data_dir, cache_dir=tmp_path, val_size=0)  # decodes the archive, writes the cache
    assert full.sizes == {"train": 50000, "val": 0, "test": 10000} and full.input_shape == (3, 32, 32)
    red = _to_uint8(full.train_x[:3], "cifar10", 255.0)[:, 0, 0, :3].tolist()
    assert red == [[59, 43, 50], [154, 126, 105], [255, 253, 253]]  # published first pixels of data_batch_1
    assert full.train_y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert full.test_y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    splits = load_cifar10(data_dir=data_dir, cache_dir=tmp_path)  # served from the cache
    assert splits.sizes == {"train": 45000, "val": 5000, "test": 10000}
    assert torch.bincount(splits.val_y).tolist() == [500] * 10 and torch.equal(splits.test_x, full.test_x)
    assert len(list(tmp_path.glob("cifar10-*.npz"))) == 1
