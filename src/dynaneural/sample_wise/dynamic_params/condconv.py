"""CondConv: conditionally parameterized convolutions — a per-sample mixture of K kernels.

Paper: B. Yang, G. Bender, Q. V. Le, J. Ngiam, "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019, arXiv:1904.04971.

A CondConv layer holds K expert kernels ``W_1..W_K`` and computes, for each sample, ``y = σ(BN(W(x) * x))`` with
``W(x) = Σ_k r_k(x) W_k`` and the routing ``r(x) = sigmoid(GlobalAvgPool(x) R)`` (Eq. 1–2). Mixing the kernels
first costs ``K·Co·Ci·kh·kw`` per sample, far less than K convolutions, so the capacity grows K-fold at a small
FLOPs increase.

Modes (there is no discrete decision; the ``decisions`` entry ``layer{i}`` is the expert with the largest
routing weight, for inspection):

* ``simulate`` — the reference of the definition by linearity: every expert's convolution ``W_k * x`` is computed
  and the outputs are mixed with ``r_k`` (K convolutions, what a "mixture of experts" would do);
* ``execute`` (and ``train``) — the paper's efficient form: mix the kernels per sample, then one grouped
  convolution with the batch folded into the groups (``functional.per_sample_conv2d``).

The two agree to float rounding (tested). The ledger charges the execute path in both modes: pooling
``Ci·H·W`` + routing ``Ci·K`` + mixing ``K·Co·Ci·kh·kw`` + the convolution + batch norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import register_flops_rule
from dynaneural.execution import Mode
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, ParamConvNet, dataset_config
from dynaneural.sample_wise.dynamic_params.functional import conv_output_size, per_sample_conv2d

__all__ = ["CondConv2d", "build_condconv_net"]


class CondConv2d(nn.Module):
    """CondConv → BN → ReLU.

    Args:
        in_chs, out_chs: channels. stride: conv stride. in_size: input height = width (for the cost).
        num_experts: K, the number of expert kernels. kernel_size: square kernel size.
    """

    def __init__(self, *, in_chs: int, out_chs: int, stride: int, in_size: int, num_experts: int = 4,
                 kernel_size: int = 3) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.in_chs, self.out_chs, self.stride, self.k = in_chs, out_chs, stride, kernel_size
        self.padding = kernel_size // 2
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_chs, in_chs, kernel_size, kernel_size))
        for w in self.weight:  # each expert initialised like a plain convolution
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.router = nn.Linear(in_chs, num_experts)
        nn.init.zeros_(self.router.bias)  # the input, not a fixed preference, ranks the experts at init
        self.bn = nn.BatchNorm2d(out_chs)
        self.in_size = in_size
        self.out_size = conv_output_size(in_size, kernel_size=kernel_size, stride=stride, padding=self.padding)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) routing weights r(x) = sigmoid(GAP(x) R)."""
        return torch.sigmoid(self.router(x.mean((2, 3))))

    def forward(self, x: torch.Tensor, *, mode: Mode = Mode.EXECUTE) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        r = self.routing(x)  # (B, K)
        if mode is Mode.SIMULATE:
            ys = F.conv2d(x, self.weight.flatten(0, 1), stride=self.stride, padding=self.padding)  # (B, K·Co, H', W')
            y = torch.einsum("bk,bkchw->bchw", r, ys.view(b, self.num_experts, self.out_chs, *ys.shape[-2:]))
        else:
            w = (r @ self.weight.flatten(1)).view(b, *self.weight.shape[1:])  # (B, Co, Ci, k, k)
            y = per_sample_conv2d(x, w, stride=self.stride, padding=self.padding)
        return F.relu(self.bn(y)), r.argmax(1)

    def cost(self) -> float:
        """FLOPs per sample: pooling + routing + kernel mixing + convolution + batch norm."""
        kernel = self.out_chs * self.in_chs * self.k * self.k
        hw_out = self.out_size * self.out_size
        return float(self.in_chs * self.in_size ** 2 + self.in_chs * self.num_experts + self.num_experts * kernel
                     + kernel * hw_out + 2 * self.out_chs * hw_out)


@register_flops_rule(CondConv2d)
def _condconv_flops(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, CondConv2d)
    return m.cost() * inputs[0].shape[0]


def build_condconv_net(cfg: ConvNetConfig, *, num_experts: int = 4) -> ParamConvNet:
    """The backbone CNN with every layer after the stem a CondConv layer of ``num_experts`` experts."""
    return ParamConvNet(cfg, lambda **kw: CondConv2d(num_experts=num_experts, **kw), method="condconv")


@register_model
def condconv_mnist(*, num_experts: int = 4, num_classes: int = 10, widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """28×28 (Fashion-)MNIST: stem 32 → CondConv 64 (stride 2) → CondConv 128 (stride 2) (or ``widths``)."""
    return build_condconv_net(dataset_config("mnist", num_classes=num_classes, widths=widths),
                              num_experts=num_experts)


@register_model
def condconv_cifar10(*, num_experts: int = 4, num_classes: int = 10, widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """32×32 CIFAR-10: stem 32 → CondConv 64, 128 (stride 2), 128 (or ``widths``)."""
    return build_condconv_net(dataset_config("cifar10", num_classes=num_classes, widths=widths),
                              num_experts=num_experts)


@register_model
def test_condconv(*, num_experts: int = 4, num_classes: int = 10) -> ParamConvNet:
    """Tiny variant for tests: 1×8×8 inputs, stem 4 → CondConv 8 → CondConv 8."""
    return build_condconv_net(ConvNetConfig(in_chans=1, input_size=8, num_classes=num_classes, widths=(4, 8, 8),
                                            strides=(1, 2, 1)), num_experts=num_experts)
