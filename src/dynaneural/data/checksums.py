"""md5 checks for dataset files, with error messages that say what to do next."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from pathlib import Path

from dynaneural.data.sources import DATA_ENV

_CHUNK = 1 << 20


class DataIntegrityError(ValueError):
    """A dataset file exists but is not what it should be (wrong md5, bad header, missing archive member)."""


def download_hint(name: str) -> str:
    """Return the command that fetches dataset ``name`` into the data folder."""
    return f"python -m dynaneural.data {name} --data-dir DIR (or dynaneural.data.download_dataset({name!r}))"


def md5_file(path: str | Path) -> str:
    """Return the hex md5 of a file, read in 1 MiB chunks.

    Args:
        path: File to hash.

    Returns:
        The 32-character lowercase hex digest.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_file_error(paths: Sequence[str | Path], *, name: str) -> FileNotFoundError:
    """Build the ``FileNotFoundError`` raised when a dataset file is absent.

    Args:
        paths: The expected path (or the accepted alternatives).
        name: Dataset name, as in ``load_dataset`` (used for the download hint).

    Returns:
        The exception (the caller raises it).
    """
    where = " or ".join(str(p) for p in paths)
    return FileNotFoundError(
        f"{name} data file not found: expected {where}. Point DynaNeural at your data folder with --data-dir DIR or "
        f"the {DATA_ENV} environment variable, or download it with: {download_hint(name)}."
    )


def verify_file(path: str | Path, *, expected: str | Collection[str], name: str) -> str:
    """Check that a file exists and has the expected md5.

    Args:
        path: File to check.
        expected: The md5 it must have, or a collection of acceptable md5s.
        name: Dataset name, as in ``load_dataset`` (used in messages).

    Returns:
        The file's md5 (handy as a cache key).

    Raises:
        FileNotFoundError: The file does not exist; the message names the path, ``--data-dir`` / ``DYNANEURAL_DATA``
            and the download helper.
        DataIntegrityError: The md5 differs; the message names the file, the expected and the actual md5.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file_error([path], name=name)
    accepted = {expected.lower()} if isinstance(expected, str) else {e.lower() for e in expected}
    actual = md5_file(path)
    if actual not in accepted:
        wanted = next(iter(accepted)) if len(accepted) == 1 else "one of " + ", ".join(sorted(accepted))
        raise DataIntegrityError(
            f"{name} file {path} failed its md5 check: expected {wanted}, got {actual}. The file is corrupt or "
            f"incomplete; delete it and download it again with: {download_hint(name)}."
        )
    return actual
