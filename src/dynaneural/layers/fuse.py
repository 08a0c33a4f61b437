"""Inference-time folding of batch norm into the preceding convolution.

At inference a batch norm is an affine map per channel; folding it into the convolution's weights and bias
removes a memory-bound pass over every activation map. Early, wide-resolution stages gain the most, which is
exactly where an early-exit network spends most of its time. Benchmarks fold *both* sides of a comparison.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batch_norms"]


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,  # type: ignore[arg-type]
                      padding_mode=conv.padding_mode).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + shift)
    return fused


def fold_batch_norms(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return the model with every ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential``
    replaced by one convolution (the batch norm becomes ``nn.Identity``). For inference only (eval statistics)."""
    model = model if inplace else copy.deepcopy(model)
    for mod in model.modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                mod._modules[a] = _fold(conv, bn)
                mod._modules[b] = nn.Identity()
    if hasattr(model, "_profiles"):
        model._profiles = {}  # what runs changed (no batch norm): the cost ledger must recount
    return model.eval()
