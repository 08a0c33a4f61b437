"""Where the datasets live: file names, official md5 sums, download URLs and folder resolution.

Layout of a data folder (``--data-dir`` / ``DYNANEURAL_DATA``)::

    <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/cifar10/cifar-10-python.tar.gz   (official)  or  cifar-10-python.tar.xz  (rebuilt, same pickles)

The tables below are looked up at call time, so tests may patch them (e.g. ``monkeypatch.setitem``).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "DYNANEURAL_DATA"
CACHE_ENV = "DYNANEURAL_CACHE"

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")

#: dataset name -> {file name: md5}. The sub-folder of the data dir is the dataset name. For ``cifar10`` the entries
#: are alternatives: whichever archive is present is used, checked against its own md5.
FILES: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",  # official archive
        "cifar-10-python.tar.xz": "ad437cf718ac71d1dddc705db8dd5a4f",  # rebuilt xz archive (same pixels and labels)
    },
}

#: dataset name -> (base URL, files fetched from it). Only official archives are downloaded.
DOWNLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", IDX_FILES),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", IDX_FILES),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", ("cifar-10-python.tar.gz",)),
}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the data folder: the explicit argument, else ``$DYNANEURAL_DATA``, else ``~/.cache/dynaneural/data``.

    Args:
        data_dir: Folder given by the caller (e.g. the ``--data-dir`` flag), or ``None``.

    Returns:
        The folder as an absolute-ish ``Path`` (``~`` expanded). It is not required to exist.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dynaneural" / "data"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the decode-cache folder: the argument, else ``$DYNANEURAL_CACHE``, else ``~/.cache/dynaneural``.

    Args:
        cache_dir: Folder given by the caller, or ``None``.

    Returns:
        The folder as a ``Path`` (``~`` expanded). It is created on first write, not here.
    """
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dynaneural"
