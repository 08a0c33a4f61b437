"""batches() and augment_cifar()."""

from __future__ import annotations

import pytest
import torch

from dynaneural.data import augment_cifar, batches


def test_batches_in_order_and_shuffled() -> None:
    x, y = torch.arange(10, dtype=torch.float32).view(10, 1), torch.arange(10)
    ordered = list(batches(x, y, batch_size=4, shuffle=False))
    assert [len(b) for _, b in ordered] == [4, 4, 2] and torch.equal(torch.cat([b for _, b in ordered]), y)
    assert [len(b) for _, b in batches(x, y, batch_size=4, shuffle=False, drop_last=True)] == [4, 4]

    def epoch(seed: int) -> torch.Tensor:
        parts = list(batches(x, y, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed)))
        assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in parts)  # pairs stay aligned
        return torch.cat([yb for _, yb in parts])

    first = epoch(0)
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, y)
    assert torch.equal(first, epoch(0)) and not torch.equal(first, epoch(1))
    with pytest.raises(ValueError, match="different numbers"):
        next(batches(x, y[:5], batch_size=2, shuffle=False))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(x, y, batch_size=0, shuffle=False))


def test_augment_cifar_crops_and_flips() -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment_cifar(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment_cifar(x, generator=torch.Generator().manual_seed(1)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):  # every output is some shifted crop of the padded image, possibly mirrored
        views = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        if any(torch.equal(out[i], v) for v in views):
            continue
        assert any(torch.equal(out[i], v.flip(-1)) for v in views), f"sample {i} is not a crop"
        flips += 1
    assert 10 < flips < 54  # about half are flipped
    assert torch.equal(augment_cifar(x, generator=None, padding=0, flip=False), x)
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_cifar(x[0], generator=None)
