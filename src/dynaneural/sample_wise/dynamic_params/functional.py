"""Machinery shared by the dynamic-parameter and dynamic-width methods: per-sample convolution and BN folding.

A per-sample kernel (CondConv, dynamic convolution, a hypernetwork, a channel-gated layer with gathered weights)
is executed as *one* grouped convolution by folding the batch into the channel axis: the input (B, Ci, H, W)
becomes (1, B·Ci, H, W), the kernels (B, Co, Ci, kh, kw) become (B·Co, Ci, kh, kw) and ``groups=B``, so group b
convolves sample b with its own kernel (CondConv, Yang et al., NeurIPS 2019, arXiv:1904.04971, Sec. 3). The
cost is exactly that of B independent convolutions; there is no Python loop over samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoldedBN", "conv_output_size", "fold_bn", "per_sample_conv2d", "per_sample_linear"]


def per_sample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      stride: int = 1, padding: int = 0, dilation: int = 1) -> torch.Tensor:
    """Convolve each sample with its own kernel, as one grouped convolution.

    Args:
        x: (B, Ci, H, W) inputs.
        weight: (B, Co, Ci, kh, kw) one kernel per sample.
        bias: (B, Co) one bias per sample, or None.

    Returns:
        (B, Co, H', W').
    """
    b, ci, h, w = x.shape
    if weight.dim() != 5 or weight.shape[0] != b or weight.shape[2] != ci:
        raise ValueError(f"weight must be (B={b}, Co, Ci={ci}, kh, kw), got {tuple(weight.shape)}")
    co = weight.shape[1]
    out = F.conv2d(x.reshape(1, b * ci, h, w), weight.reshape(b * co, ci, *weight.shape[3:]),
                   None if bias is None else bias.reshape(b * co), stride=stride, padding=padding,
                   dilation=dilation, groups=b)  # (1, B·Co, H', W')
    return out.view(b, co, out.shape[-2], out.shape[-1])


def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y_b = W_b x_b + b_b`` for x (B, I), weight (B, O, I), bias (B, O) or (O,): one batched matmul."""
    y = torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1)  # (B, O)
    return y if bias is None else y + bias


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode batch norm into the preceding convolution: (weight·scale, (bias − mean)·scale + shift).

    ``weight`` is (Co, ...) with Co = bn's channels. Used by execute paths so the batch norm costs no pass over
    the activations (benchmarks fold the static side too, see ``layers.fuse``)."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    b0 = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), (b0 - bn.running_mean) * scale + shift


class FoldedBN:
    """Folded (weight, bias) pairs of convolutions followed by eval-mode batch norms, computed once and reused.

    An execute path that folds on every call pays a handful of small ops per layer per forward (visible at batch 1
    against a static twin whose batch norms were folded once). Entries are keyed by a name and recomputed whenever
    the conv weight, the batch norm's parameters or statistics change (their version counters move on every
    in-place update: optimizer steps, ``load_state_dict``, BN statistics updates). With gradients enabled nothing
    is cached (the fold must stay in the autograd graph).
    """

    def __init__(self) -> None:
        self._store: dict[object, tuple[tuple[tuple[int, int], ...], torch.Tensor, torch.Tensor]] = {}

    def __call__(self, key: object, weight: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():
            return fold_bn(weight, bn, bias)
        parts = (weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bias)
        try:
            stamp = tuple((t._version, t.data_ptr()) for t in parts if t is not None)
        except RuntimeError:  # inference tensors keep no version counter: nothing to key a cache on
            return fold_bn(weight, bn, bias)
        hit = self._store.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        w, b = fold_bn(weight, bn, bias)
        self._store[key] = (stamp, w, b)
        return w, b


def conv_output_size(size: int, *, kernel_size: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution along one axis."""
    return (size + 2 * padding - kernel_size) // stride + 1
