"""Squeeze-and-excitation: input-dependent channel scaling (dynamic features).

Paper: J. Hu, L. Shen, G. Sun, "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.

After each conv-BN-ReLU layer an SE block squeezes the map by global average pooling, excites with a two-layer
bottleneck ``s = sigmoid(W2 ReLU(W1 z))`` (reduction r) and rescales the channels, ``y_c = s_c · x_c`` (Eq. 2–4).
The excitation is a per-sample re-weighting of the features — equivalently of the next layer's input weights —
computed from the input.

Modes: there is nothing to skip, so ``simulate`` and ``execute`` run the same computation; ``decisions
["layer{i}"]`` is the most excited channel of each sample (for inspection). ``has_static_twin`` is False: the
network *is* its SE blocks (the static network of the same architecture without them is the comparison).
Cost: the conv, batch norm, and the SE block: pooling ``C·H·W``, ``2·C·C/r`` for the bottleneck and ``C·H·W``
multiplications for the rescaling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import register_flops_rule
from dynaneural.execution import Mode
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, ParamConvNet, dataset_config
from dynaneural.sample_wise.dynamic_params.functional import conv_output_size

__all__ = ["SEConv2d", "build_se_net"]


class SEConv2d(nn.Module):
    """3×3 conv → BN → ReLU → squeeze-and-excitation.

    Args:
        in_chs, out_chs: channels. stride: conv stride. in_size: input height = width (for the cost).
        reduction: r, the bottleneck's hidden size is ``max(out_chs // r, 4)``.
    """

    def __init__(self, *, in_chs: int, out_chs: int, stride: int, in_size: int, reduction: int = 4) -> None:
        super().__init__()
        self.in_chs, self.out_chs = in_chs, out_chs
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        hidden = max(out_chs // reduction, 4)
        self.fc1 = nn.Linear(out_chs, hidden)
        self.fc2 = nn.Linear(hidden, out_chs)
        for fc in (self.fc1, self.fc2):  # the input, not fixed biases, ranks the channels at init
            nn.init.zeros_(fc.bias)
        self.in_size = in_size
        self.out_size = conv_output_size(in_size, kernel_size=3, stride=stride, padding=1)

    def excitation(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C) channel weights s = sigmoid(W2 ReLU(W1 GAP(y)))."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))

    def forward(self, x: torch.Tensor, *, mode: Mode = Mode.EXECUTE) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.relu(self.bn(self.conv(x)))
        s = self.excitation(y)  # (B, C)
        return y * s[:, :, None, None], s.argmax(1)

    def cost(self) -> float:
        """FLOPs per sample: convolution + batch norm + pooling + bottleneck + rescaling."""
        hw = self.out_size * self.out_size
        conv = self.in_chs * self.out_chs * 9 * hw + 2 * self.out_chs * hw
        se = 2 * self.out_chs * hw + self.fc1.in_features * self.fc1.out_features \
            + self.fc2.in_features * self.fc2.out_features
        return float(conv + se)


@register_flops_rule(SEConv2d)
def _se_flops(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, SEConv2d)
    return m.cost() * inputs[0].shape[0]


def build_se_net(cfg: ConvNetConfig, *, reduction: int = 4) -> ParamConvNet:
    """The backbone CNN with an SE block after every layer after the stem."""
    return ParamConvNet(cfg, lambda **kw: SEConv2d(reduction=reduction, **kw), method="squeeze_excite")


@register_model
def se_convnet_mnist(*, reduction: int = 4, num_classes: int = 10, widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """28×28 (Fashion-)MNIST: stem 32 → conv-SE 64 (stride 2) → conv-SE 128 (stride 2) (or ``widths``)."""
    return build_se_net(dataset_config("mnist", num_classes=num_classes, widths=widths), reduction=reduction)


@register_model
def se_convnet_cifar10(*, reduction: int = 4, num_classes: int = 10, widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """32×32 CIFAR-10: stem 32 → conv-SE 64, 128 (stride 2), 128 (or ``widths``)."""
    return build_se_net(dataset_config("cifar10", num_classes=num_classes, widths=widths), reduction=reduction)


@register_model
def test_squeeze_excite(*, reduction: int = 2, num_classes: int = 10) -> ParamConvNet:
    """Tiny variant for tests: 1×8×8 inputs, stem 4 → conv-SE 8 → conv-SE 8."""
    return build_se_net(ConvNetConfig(in_chans=1, input_size=8, num_classes=num_classes, widths=(4, 8, 8),
                                      strides=(1, 2, 1)), reduction=reduction)
