"""Download the datasets from their official mirrors (md5-checked, atomic).

Usage: ``python -m dynaneural.data mnist --data-dir DIR`` (names: mnist, fashion-mnist, cifar10).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dynaneural.data.checksums import DataIntegrityError, md5_file
from dynaneural.data.sources import DOWNLOADS, FILES, resolve_data_dir


def fetch_url(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` into the file ``dest`` (overwritten)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def download_file(url: str, dest: str | Path, *, md5: str) -> Path:
    """Download ``url`` to a temporary file beside ``dest``, check its md5, then rename it into place.

    Args:
        url: Source URL.
        dest: Final path; its folder is created if needed. An existing file is replaced only on success.
        md5: Expected md5 of the downloaded file.

    Returns:
        ``dest`` as a ``Path``.

    Raises:
        DataIntegrityError: The download does not match ``md5``; the partial file is removed.
        urllib.error.URLError: The download failed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fetch_url(url, tmp)
        actual = md5_file(tmp)
        if actual != md5.lower():
            raise DataIntegrityError(
                f"download of {url} failed its md5 check: expected {md5}, got {actual}. The download is corrupt or "
                f"incomplete and was removed; {dest} was left untouched. Try again."
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_dataset(name: str, *, data_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """Download the files of one dataset into ``<data_dir>/<name>/``, skipping files already present and valid.

    Args:
        name: ``mnist``, ``fashion-mnist`` or ``cifar10`` (``digits`` ships with scikit-learn: nothing to download).
        data_dir: Data folder; resolved with ``resolve_data_dir`` (argument, ``$DYNANEURAL_DATA``, default).
        force: Download even when a valid copy is present.

    Returns:
        The paths of the dataset's files (downloaded or already present).

    Raises:
        ValueError: Unknown dataset name.
    """
    if name == "digits":
        return []
    if name not in DOWNLOADS:
        raise ValueError(f"cannot download {name!r}; downloadable datasets: {', '.join(DOWNLOADS)}")
    folder = resolve_data_dir(data_dir) / name
    table = FILES[name]
    if name == "cifar10" and not force:  # the archives are alternatives: any valid one will do (e.g. the .tar.xz)
        for filename, md5 in table.items():
            if (folder / filename).is_file() and md5_file(folder / filename) == md5:
                return [folder / filename]
    base_url, files = DOWNLOADS[name]
    paths = []
    for filename in files:
        dest = folder / filename
        if force or not (dest.is_file() and md5_file(dest) == table[filename]):
            download_file(base_url + filename, dest, md5=table[filename])
        paths.append(dest)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m dynaneural.data NAME [NAME ...] [--data-dir DIR] [--force]``."""
    parser = argparse.ArgumentParser(prog="python -m dynaneural.data", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(DOWNLOADS), metavar="NAME", help=", ".join(DOWNLOADS))
    parser.add_argument("--data-dir", default=None, help="data folder (default: $DYNANEURAL_DATA or ~/.cache/...)")
    parser.add_argument("--force", action="store_true", help="download even when a valid copy is present")
    args = parser.parse_args(argv)
    for name in args.names:
        for path in download_dataset(name, data_dir=args.data_dir, force=args.force):
            print(path)
    return 0
