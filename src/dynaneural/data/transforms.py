"""In-memory batching and batch-level augmentation (vectorised, no per-sample Python loop)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def batches(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` mini-batches from tensors that already sit in memory.

    Args:
        x: Inputs, first dimension = samples.
        y: Targets, same first dimension.
        batch_size: Samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: Visit samples in a random order (from ``generator``, a CPU generator) instead of in order.
        generator: Random source for the order; ``None`` uses torch's global generator.
        drop_last: Skip the final incomplete batch.

    Yields:
        ``(xb, yb)`` pairs on the device of ``x`` / ``y``; slices (views) when not shuffling.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x and y hold different numbers of samples: {len(x)} vs {len(y)}")
    n = len(x)
    stop = n - n % batch_size if drop_last else n
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start: start + batch_size], y[start: start + batch_size]
        else:
            idx = order[start: start + batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]


def augment_cifar(x: torch.Tensor, *, generator: torch.Generator | None, padding: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding plus random horizontal flip, for a whole ``(N, C, H, W)`` batch at once.

    On normalized inputs the zero padding is the per-channel mean colour.

    Args:
        x: Batch of images ``(N, C, H, W)``.
        generator: CPU random generator (``None`` uses torch's global one).
        padding: Pixels of padding on each side; crops are shifted by up to this much.
        flip: Also flip each image horizontally with probability 1/2.

    Returns:
        A new tensor of the same shape, dtype and device.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_cifar expects a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator).to(x.device)
    rows = dy + torch.arange(h, device=x.device)  # (n, h)
    cols = dx + torch.arange(w, device=x.device)  # (n, w)
    if flip:
        flipped = torch.rand(n, 1, generator=generator).to(x.device) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    index = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


#: Batch augmentations a recipe can name (``options.augment``).
AUGMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {"cifar": augment_cifar}


def augmentation(name: str | None) -> Callable[..., torch.Tensor] | None:
    """The batch augmentation a recipe names (``None``: none); an unknown name is an error."""
    if name is None:
        return None
    if name not in AUGMENTATIONS:
        raise ValueError(f"options.augment must be one of {sorted(AUGMENTATIONS)} or absent, got {name!r}")
    return AUGMENTATIONS[name]
