"""md5 checks, idx parsing, downloads (without network) and the CIFAR-10 tar/pickle path and cache (synthetic)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import dynaneural.data.download as download
import dynaneural.data.loaders as loaders
from dynaneural.data import (
    NORMALIZATION,
    DataIntegrityError,
    download_dataset,
    download_file,
    load_cifar10,
    load_mnist,
    md5_file,
    read_idx,
    verify_file,
)
from dynaneural.data.sources import FILES

MNIST_NAMES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


# --- md5 and missing files --------------------------------------------------------------------------------------------

def test_md5_file_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 << 20))  # several chunks
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    assert md5_file(path) == digest
    assert verify_file(path, expected=digest.upper(), name="mnist") == digest
    assert verify_file(path, expected=["0" * 32, digest], name="mnist") == digest
    with pytest.raises(DataIntegrityError, match="one of"):
        verify_file(path, expected=["0" * 32, "1" * 32], name="mnist")


def test_corrupted_file_is_reported_with_both_md5s(require_real, tmp_path: Path) -> None:
    real = require_real(*(f"mnist/{n}" for n in MNIST_NAMES)) / "mnist"
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_NAMES:
        if name.startswith("train"):
            (folder / name).symlink_to(real / name)
    copy = folder / "t10k-labels-idx1-ubyte.gz"
    shutil.copyfile(real / copy.name, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    shutil.copyfile(real / "t10k-images-idx3-ubyte.gz", folder / "t10k-images-idx3-ubyte.gz")
    expected, actual = FILES["mnist"][copy.name], hashlib.md5(bytes(data)).hexdigest()
    with pytest.raises(DataIntegrityError) as info:
        load_mnist(data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(copy) in message and expected in message and actual in message and "corrupt or incomplete" in message


def test_missing_file_names_path_env_and_download_helper(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(data_dir=tmp_path)
    message = str(info.value)
    expected_path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    assert str(expected_path) in message and "DYNANEURAL_DATA" in message and "--data-dir" in message
    assert "python -m dynaneural.data mnist" in message
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz or .*cifar-10-python\.tar\.xz"):
        load_cifar10(data_dir=tmp_path, cache_dir=tmp_path / "cache")


# --- idx parsing ------------------------------------------------------------------------------------------------------

def _idx_bytes(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + payload


def test_read_idx_round_trip_and_bad_headers(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(_idx_bytes(0x803, images.shape, images.tobytes())))
    assert np.array_equal(read_idx(good, expected_magic=0x803), images)

    bad_magic = tmp_path / "bad-magic.gz"
    bad_magic.write_bytes(gzip.compress(_idx_bytes(0x12345803, images.shape, images.tobytes())))
    with pytest.raises(DataIntegrityError, match="bad idx magic number 0x12345803"):
        read_idx(bad_magic)
    with pytest.raises(DataIntegrityError, match="expected 0x00000801"):
        read_idx(good, expected_magic=0x801)  # images where labels were expected

    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(_idx_bytes(0x803, images.shape, images.tobytes()[:-1])))
    with pytest.raises(DataIntegrityError, match="announces shape"):
        read_idx(truncated)
    not_gzip = tmp_path / "not-gzip.gz"
    not_gzip.write_bytes(b"this is not gzip data")
    with pytest.raises(DataIntegrityError, match="not a readable gzip"):
        read_idx(not_gzip)


def test_loader_catches_bad_idx_magic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_NAMES:  # tiny files that pass the (patched) md5 table; the labels carry the images magic
        n = 60000 if name.startswith("train") else 10000
        raw = _idx_bytes(0x803, (n,), bytes(n)) if "labels" in name else _idx_bytes(0x803, (0, 28, 28), b"")
        blob = gzip.compress(raw)
        (folder / name).write_bytes(blob)
        monkeypatch.setitem(FILES["mnist"], name, hashlib.md5(blob).hexdigest())
    with pytest.raises(DataIntegrityError, match="bad idx magic"):
        load_mnist(data_dir=tmp_path)


# --- downloads (the network fetch is replaced) ------------------------------------------------------------------------

def test_download_failing_md5_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "fetch_url", lambda url, dest: Path(dest).write_bytes(b"truncated"))
    dest = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DataIntegrityError, match=hashlib.md5(b"truncated").hexdigest()):
        download_file("https://example.invalid/file.gz", dest, md5="0" * 32)
    assert list((tmp_path / "mnist").iterdir()) == []  # neither the partial download nor the destination


def test_download_dataset_atomic_and_skips_valid_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = {name: name.encode() * 3 for name in MNIST_NAMES}
    for name, blob in contents.items():
        monkeypatch.setitem(FILES["mnist"], name, hashlib.md5(blob).hexdigest())
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        Path(dest).write_bytes(contents[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    paths = download_dataset("mnist", data_dir=tmp_path)
    assert [p.name for p in paths] == MNIST_NAMES and all(p.read_bytes() == contents[p.name] for p in paths)
    assert fetched[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_NAMES)  # no leftovers
    assert download_dataset("mnist", data_dir=tmp_path) == paths and len(fetched) == 4  # valid: not fetched again
    assert download_dataset("digits", data_dir=tmp_path) == []
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10"):
        download_dataset("imagenet", data_dir=tmp_path)


# --- CIFAR-10: synthetic archives -------------------------------------------------------------------------------------

def _cifar_batches(n: int, offset: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny batches: ``n`` images per batch, pixels derived from ``offset`` so different archives differ."""
    rng = np.random.default_rng(offset)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {m: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)])
            for m in names}


def _write_archive(path: Path, batches: dict[str, tuple[np.ndarray, list[int]]], *, drop: str | None = None) -> str:
    mode = "w:xz" if path.name.endswith(".xz") else "w:gz"
    with tarfile.open(path, mode) as tar:
        for member, (data, labels) in batches.items():
            if member == drop:
                continue
            blob = pickle.dumps({"batch_label": member, "data": data, "labels": labels}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return md5_file(path)


def _pixels(x: torch.Tensor) -> np.ndarray:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION["cifar10"])
    return torch.round((x * std + mean) * 255).to(torch.uint8).reshape(len(x), -1).numpy()


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "cifar10"
    folder.mkdir(parents=True)
    return folder


def test_cifar10_synthetic_archive_and_cache_round_trip(cifar_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _cifar_batches(8, offset=1)
    archive = cifar_dir / "cifar-10-python.tar.gz"
    monkeypatch.setitem(FILES["cifar10"], archive.name, _write_archive(archive, batches))
    cache = tmp_path / "cache"
    splits = load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=10, seed=3)
    assert splits.sizes == {"train": 30, "val": 10, "test": 8} and splits.input_shape == (3, 32, 32)
    assert np.array_equal(_pixels(splits.test_x), batches["test_batch"][0])
    assert splits.test_y.tolist() == batches["test_batch"][1]
    train_rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    got = np.concatenate([_pixels(splits.train_x), _pixels(splits.val_x)])
    assert sorted(map(bytes, got)) == sorted(map(bytes, train_rows))  # train + val = the five batches

    cache_files = list(cache.glob("*.npz"))
    assert [p.name for p in cache_files] == [f"cifar10-v1-{md5_file(archive)}.npz"]
    monkeypatch.setattr(loaders, "read_cifar10_archive", lambda path: pytest.fail("cache not used"))
    again = load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=10, seed=3)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, field), getattr(splits, field))


def test_cifar10_changed_archive_is_not_served_from_stale_cache(cifar_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    archive, cache = cifar_dir / "cifar-10-python.tar.xz", tmp_path / "cache"
    monkeypatch.setitem(FILES["cifar10"], archive.name, _write_archive(archive, _cifar_batches(4, offset=1)))
    first = load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=4)
    new_batches = _cifar_batches(4, offset=2)
    monkeypatch.setitem(FILES["cifar10"], archive.name, _write_archive(archive, new_batches))
    second = load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=4)
    assert np.array_equal(_pixels(second.test_x), new_batches["test_batch"][0])
    assert not torch.equal(first.test_x, second.test_x) and len(list(cache.glob("*.npz"))) == 2


def test_cifar10_unreadable_cache_is_rebuilt_and_cache_can_be_off(cifar_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    archive, cache = cifar_dir / "cifar-10-python.tar.gz", tmp_path / "cache"
    md5 = _write_archive(archive, _cifar_batches(4, offset=1))
    monkeypatch.setitem(FILES["cifar10"], archive.name, md5)
    cache.mkdir()
    (cache / f"cifar10-v1-{md5}.npz").write_bytes(b"garbage from an interrupted run")
    splits = load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=4)
    assert splits.sizes["test"] == 4
    with np.load(cache / f"cifar10-v1-{md5}.npz") as npz:
        assert npz["train_x"].shape == (20, 3, 32, 32)
    off = tmp_path / "off"
    load_cifar10(data_dir=cifar_dir.parent, cache_dir=off, val_size=4, use_cache=False)
    assert not off.exists()


def test_cifar10_bad_archives(cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, cache = cifar_dir / "cifar-10-python.tar.gz", tmp_path / "cache"
    _write_archive(archive, _cifar_batches(4, offset=1))
    with pytest.raises(DataIntegrityError, match=FILES["cifar10"][archive.name]):  # real md5 table: mismatch
        load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache)

    md5 = _write_archive(archive, _cifar_batches(4, 1), drop="test_batch")
    monkeypatch.setitem(FILES["cifar10"], archive.name, md5)
    with pytest.raises(DataIntegrityError, match="lacks cifar-10-batches-py/test_batch"):
        load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=4)

    class Evil:
        def __reduce__(self):  # would run os.getcwd() on unpickling
            return (os.getcwd, ())

    with tarfile.open(archive, "w:gz") as tar:
        blob = pickle.dumps({"data": Evil(), "labels": []}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setitem(FILES["cifar10"], archive.name, md5_file(archive))
    with pytest.raises(DataIntegrityError, match="refusing to load"):
        load_cifar10(data_dir=cifar_dir.parent, cache_dir=cache, val_size=4)
