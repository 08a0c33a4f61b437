"""FoldedBN: the conv+BN fold execute paths reuse, recomputed whenever a weight or statistic changes."""

import torch
from torch import nn

from dynaneural.sample_wise.dynamic_params.functional import FoldedBN, fold_bn


def _layer():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return conv, bn


def test_cached_until_a_weight_or_statistic_changes():
    conv, bn = _layer()
    cache = FoldedBN()
    with torch.inference_mode():
        w1, b1 = cache("a", conv.weight, bn)
        w2, b2 = cache("a", conv.weight, bn)
        assert w2 is w1 and b2 is b1  # reused, not recomputed
    with torch.no_grad():
        bn.running_var.mul_(2.0)  # what a BN statistics update or load_state_dict does
    with torch.inference_mode():
        w3, b3 = cache("a", conv.weight, bn)
    assert w3 is not w1
    ref_w, ref_b = fold_bn(conv.weight.detach(), bn)
    torch.testing.assert_close(w3, ref_w)
    torch.testing.assert_close(b3, ref_b)
    with torch.no_grad():
        conv.weight.add_(1.0)  # an optimizer step
        w4, _ = cache("a", conv.weight, bn)
    torch.testing.assert_close(w4, fold_bn(conv.weight.detach(), bn)[0])
    # sliced weights (slimmable levels) are separate entries
    with torch.no_grad():
        w5, _ = cache("b", conv.weight[:2, :2], bn_small := nn.BatchNorm2d(2).eval())
    assert w5.shape == (2, 2, 3, 3) and bn_small.num_features == 2


def test_nothing_cached_with_gradients_enabled():
    conv, bn = _layer()
    cache = FoldedBN()
    w, _ = cache("a", conv.weight, bn)
    assert w.requires_grad and not cache._store
    w.sum().backward()
    assert conv.weight.grad is not None
