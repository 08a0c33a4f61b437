"""Parsers for the raw file formats: idx (MNIST, Fashion-MNIST) and the CIFAR-10 python-pickle tarball."""

from __future__ import annotations

import gzip
import lzma
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dynaneural.data.checksums import DataIntegrityError

IDX_LABELS_MAGIC = 0x00000801
IDX_IMAGES_MAGIC = 0x00000803
CIFAR10_TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_MEMBER = "test_batch"
_CIFAR_DIR = "cifar-10-batches-py"


def read_idx(path: str | Path, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) of unsigned bytes.

    Args:
        path: ``*.gz`` or raw idx file.
        expected_magic: Required magic number (``0x801`` labels, ``0x803`` images), or ``None`` for any uint8 idx.

    Returns:
        A uint8 array of the shape stored in the header.

    Raises:
        DataIntegrityError: Unreadable gzip stream, bad magic number, or a payload whose size does not match the header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataIntegrityError(f"{path} is not a readable gzip file ({exc}); download it again") from exc
    if len(raw) < 4:
        raise DataIntegrityError(f"{path} is too short ({len(raw)} bytes) to be an idx file")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    bad_magic = expected_magic is not None and magic != expected_magic
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08 or ndim == 0 or bad_magic:
        wanted = f"0x{expected_magic:08x}" if expected_magic is not None else "0x000008NN (uint8 idx)"
        raise DataIntegrityError(f"{path} has a bad idx magic number 0x{magic:08x}, expected {wanted}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataIntegrityError(f"{path}: idx header truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataIntegrityError(
            f"{path}: idx header announces shape {shape} ({int(np.prod(shape))} bytes) but holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtins: a tampered archive cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_batch(handle: Any, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(handle, encoding="latin1").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, AttributeError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise DataIntegrityError(f"{path}: member {member} is not a CIFAR-10 batch ({exc})") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataIntegrityError(
            f"{path}: member {member} holds data {data.dtype} {data.shape} and {labels.size} labels; "
            "expected uint8 (N, 3072) and N labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataIntegrityError(f"{path}: member {member} holds labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10_archive(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``data_batch_1..5`` and ``test_batch`` straight out of a CIFAR-10 python tarball (any compression).

    Args:
        path: ``cifar-10-python.tar.gz`` / ``.tar.xz`` holding ``cifar-10-batches-py/``.

    Returns:
        ``(train_x, train_y, test_x, test_y)``: uint8 ``(N, 3, 32, 32)`` images and int64 labels, official order.

    Raises:
        DataIntegrityError: Unreadable archive, missing member or malformed batch.
    """
    path = Path(path)
    wanted = {*CIFAR10_TRAIN_MEMBERS, CIFAR10_TEST_MEMBER}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one pass: stream-friendly for compressed archives
                parts = PurePosixPath(member.name).parts
                if member.isfile() and len(parts) == 2 and parts[0] == _CIFAR_DIR and parts[1] in wanted:
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular file always has a stream
                    batches[parts[1]] = _read_batch(handle, parts[1], path)
    except (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error, OSError) as exc:
        raise DataIntegrityError(
            f"{path} is not a readable CIFAR-10 tarball ({exc}); delete it and download it again"
        ) from exc
    missing = sorted(wanted - batches.keys())
    if missing:
        raise DataIntegrityError(f"{path} lacks {', '.join(f'{_CIFAR_DIR}/{m}' for m in missing)}")
    train = [batches[m] for m in CIFAR10_TRAIN_MEMBERS]
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, *batches[CIFAR10_TEST_MEMBER]
