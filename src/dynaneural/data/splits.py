"""The ``DatasetSplits`` container and deterministic stratified splitting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train / validation / test tensors of one dataset, kept in memory.

    Attributes:
        name: Dataset name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``).
        train_x: float32 ``(N, C, H, W)``, normalized with the dataset's mean/std constants (``NORMALIZATION``).
        train_y: int64 ``(N,)`` class indices.
        val_x: Validation inputs carved from the training set (may be empty).
        val_y: Validation labels.
        test_x: Test inputs.
        test_y: Test labels.
        num_classes: Number of classes.
        input_shape: ``(C, H, W)``.
        classes: Class names, indexed by label.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"input_shape must be three positive ints (C, H, W), got {self.input_shape!r}")
        if len(self.classes) != self.num_classes or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} does not match {len(self.classes)} class names")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or tuple(x.shape[1:]) != shape:
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                want = ", ".join(map(str, shape))
                raise ValueError(f"{split}_x must be a float32 tensor of shape (N, {want}), got {got}")
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"{split}_y must be an int64 tensor of shape ({x.shape[0]},), got {got}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{split}_y holds labels outside [0, {self.num_classes})")
        if len(self.train_y) == 0 or len(self.test_y) == 0:
            raise ValueError("train and test splits must not be empty")

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split: ``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


def stratified_split(labels: np.ndarray, *, n_holdout: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (kept, held out), keeping class proportions; deterministic given ``rng``'s state.

    Each class gives ``n_holdout * count / len(labels)`` samples, rounded by largest remainder so the total is exact.

    Args:
        labels: 1-D integer labels.
        n_holdout: Number of indices to hold out, ``0 <= n_holdout <= len(labels)``.
        rng: Random generator (consumed).

    Returns:
        ``(kept, held_out)``: two sorted int64 index arrays that partition ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    if not 0 <= n_holdout <= len(labels):
        raise ValueError(f"cannot hold out {n_holdout} of {len(labels)} samples")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n_holdout / max(len(labels), 1))
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: n_holdout - int(take.sum())]] += 1
    kept, held = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for cls, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        held.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))
