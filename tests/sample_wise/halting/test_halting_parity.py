"""The parity task: deterministic generation, non-zero counts, labels, extrapolation split, evaluation."""

from types import SimpleNamespace

import pytest
import torch

from dynaneural.data import load_dataset
from dynaneural.sample_wise.halting.parity import evaluate_halting, make_parity, parity_batch


def test_parity_vectors_counts_and_labels():
    g = torch.Generator().manual_seed(0)
    x, y = parity_batch(2000, n_bits=16, min_nonzero=3, max_nonzero=9, generator=g)
    assert x.dtype == torch.float32 and x.shape == (2000, 16)
    assert set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}
    k = (x != 0).sum(1)
    assert int(k.min()) == 3 and int(k.max()) == 9
    assert torch.equal(y, (x == 1).sum(1) % 2)
    assert 0.4 < float(y.float().mean()) < 0.6
    with pytest.raises(ValueError):
        parity_batch(4, n_bits=8, max_nonzero=9)


def test_make_parity_is_deterministic_and_splits_extrapolation():
    a = make_parity(n_bits=12, train_size=300, val_size=50, test_size=80, train_max_nonzero=6, seed=3)
    b = make_parity(n_bits=12, train_size=300, val_size=50, test_size=80, train_max_nonzero=6, seed=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.extra_y, b.extra_y)
    assert int((a.train_x != 0).sum(1).max()) <= 6 and int((a.test_x != 0).sum(1).max()) <= 6
    assert int((a.extra_x != 0).sum(1).min()) == 7 and a.extra_x.shape == (80, 12)
    full = make_parity(n_bits=12, train_size=10, val_size=10, test_size=10, seed=0)
    assert full.extra_x.shape[0] == 0


def test_load_dataset_parity():
    d = load_dataset("parity", train_limit=100, val_size=20)
    assert d.train_x.shape == (100, 1, 1, 16) and d.num_classes == 2


class _Stub(torch.nn.Module):
    """Predicts "odd" always, with 3 steps per sample."""

    def forward(self, x, mode=None):
        b = x.shape[0]
        return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]]).expand(b, 2),
                               decisions={"steps": torch.full((b,), 3)}, cost=torch.full((b,), 10.0,
                                                                                        dtype=torch.float64))


def test_evaluate_halting_on_interpolation_and_extrapolation_splits():
    d = make_parity(n_bits=10, train_size=10, val_size=10, test_size=500, train_max_nonzero=5, seed=1)
    for x, y in ((d.test_x, d.test_y), (d.extra_x, d.extra_y)):
        res = evaluate_halting(_Stub(), x, y, batch_size=64)
        assert res["sequence_error"] == pytest.approx(1 - float(y.float().mean()))
        assert res["mean_steps"] == 3 and res["mean_flops"] == 10 and res["samples"] == 500
    empty = evaluate_halting(_Stub(), d.extra_x[:0], d.extra_y[:0])
    assert empty["samples"] == 0
