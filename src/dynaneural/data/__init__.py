"""Datasets for DynaNeural: md5-checked loaders that return in-memory train/val/test tensors.

Example:
    >>> from dynaneural.data import load_dataset
    >>> splits = load_dataset("digits", seed=0)
    >>> splits.train_x.shape, splits.num_classes
    (torch.Size([1077, 1, 8, 8]), 10)

File-based datasets are read from the data folder: ``--data-dir`` / ``$DYNANEURAL_DATA`` / ``~/.cache/dynaneural/data``
(see ``dynaneural.data.sources`` for the layout); fetch them with ``python -m dynaneural.data NAME``.
"""

from dynaneural.data.checksums import DataIntegrityError, md5_file, verify_file
from dynaneural.data.download import download_dataset, download_file
from dynaneural.data.formats import read_cifar10_archive, read_idx
from dynaneural.data.loaders import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    NORMALIZATION,
    list_datasets,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from dynaneural.data.sources import CACHE_ENV, DATA_ENV, resolve_cache_dir, resolve_data_dir
from dynaneural.data.splits import DatasetSplits, stratified_split
from dynaneural.data.transforms import augment_cifar, augmentation, batches

__all__ = [
    "CACHE_ENV",
    "CIFAR10_CLASSES",
    "DATA_ENV",
    "FASHION_MNIST_CLASSES",
    "NORMALIZATION",
    "DataIntegrityError",
    "DatasetSplits",
    "augment_cifar",
    "augmentation",
    "batches",
    "download_dataset",
    "download_file",
    "list_datasets",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "md5_file",
    "read_cifar10_archive",
    "read_idx",
    "resolve_cache_dir",
    "resolve_data_dir",
    "stratified_split",
    "verify_file",
]
