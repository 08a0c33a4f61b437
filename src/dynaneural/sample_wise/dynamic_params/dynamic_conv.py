"""Dynamic convolution: attention over K kernels, aggregated per sample, with temperature annealing.

Paper: Y. Chen, X. Dai, M. Liu, D. Chen, L. Yuan, Z. Liu, "Dynamic Convolution: Attention over Convolution
Kernels", CVPR 2020, arXiv:1912.03458.

A layer holds K kernels and biases and computes ``y = ReLU(BN(W̃(x) * x + b̃(x)))`` with ``W̃ = Σ_k π_k W_k``,
``b̃ = Σ_k π_k b_k`` and the attention ``π(x) = softmax(FC(ReLU(FC(GAP(x)))) / τ)`` (Sec. 3, a squeeze-and-
excitation-style branch with reduction 4). Training uses a large temperature early so that all kernels learn
(near-uniform attention) and anneals it: ``τ`` goes linearly from 30 to 1 over the first ``anneal_fraction``
of training (the paper anneals over its first 10 epochs), driven by the training loop through
``set_train_progress`` and a :class:`~dynaneural.policies.TemperatureSchedule`. ``τ`` is a buffer, so a checkpoint
keeps the annealed value.

Modes (no discrete decision; ``decisions["layer{i}"]`` is the kernel with the largest attention):
``simulate`` computes every kernel's convolution and mixes the outputs with π (the definition, by linearity);
``execute``/``train`` mix the kernels first and run one grouped convolution (batch folded into groups). They
agree to float rounding. The ledger charges the execute path: pooling + the attention MLP + mixing
``K·(Co·Ci·kh·kw + Co)`` + the convolution + batch norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import register_flops_rule
from dynaneural.execution import Mode
from dynaneural.policies import TemperatureSchedule
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, ParamConvNet, dataset_config
from dynaneural.sample_wise.dynamic_params.functional import conv_output_size, per_sample_conv2d

__all__ = ["DynamicConv2d", "build_dynamic_conv_net"]

#: The paper's annealing: τ from 30 down to 1, linearly.
_PAPER_SCHEDULE = TemperatureSchedule(start=30.0, end=1.0, kind="linear")


class DynamicConv2d(nn.Module):
    """Dynamic convolution → BN → ReLU.

    Args:
        in_chs, out_chs: channels. stride: conv stride. in_size: input height = width (for the cost).
        num_kernels: K. reduction: the attention MLP's hidden size is ``max(in_chs // reduction, 4)``.
        schedule: temperature τ as a function of the annealing progress.
        anneal_fraction: the share of training over which τ anneals (progress p maps to min(1, p / fraction)).
    """

    def __init__(self, *, in_chs: int, out_chs: int, stride: int, in_size: int, num_kernels: int = 4,
                 reduction: int = 4, kernel_size: int = 3,
                 schedule: TemperatureSchedule = _PAPER_SCHEDULE, anneal_fraction: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction must lie in (0, 1], got {anneal_fraction}")
        self.in_chs, self.out_chs, self.stride, self.k = in_chs, out_chs, stride, kernel_size
        self.padding = kernel_size // 2
        self.num_kernels = num_kernels
        self.weight = nn.Parameter(torch.empty(num_kernels, out_chs, in_chs, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_chs))
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        hidden = max(in_chs // reduction, 4)
        self.fc1 = nn.Linear(in_chs, hidden)
        self.fc2 = nn.Linear(hidden, num_kernels)
        nn.init.zeros_(self.fc2.bias)  # the input, not a fixed preference, ranks the kernels at init
        self.bn = nn.BatchNorm2d(out_chs)
        self.schedule, self.anneal_fraction = schedule, anneal_fraction
        self.register_buffer("tau", torch.tensor(schedule(0.0)))
        self.in_size = in_size
        self.out_size = conv_output_size(in_size, kernel_size=kernel_size, stride=stride, padding=self.padding)

    def set_train_progress(self, progress: float) -> None:
        """Anneal τ: the schedule evaluated at ``min(1, progress / anneal_fraction)``."""
        self.tau.fill_(self.schedule(min(1.0, progress / self.anneal_fraction)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) attention over the kernels, softmax at temperature τ."""
        return F.softmax(self.fc2(F.relu(self.fc1(x.mean((2, 3))))) / self.tau, dim=-1)

    def forward(self, x: torch.Tensor, *, mode: Mode = Mode.EXECUTE) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        pi = self.attention(x)  # (B, K)
        bias = pi @ self.bias  # (B, Co)
        if mode is Mode.SIMULATE:
            ys = F.conv2d(x, self.weight.flatten(0, 1), stride=self.stride, padding=self.padding)  # (B, K·Co, H', W')
            y = torch.einsum("bk,bkchw->bchw", pi, ys.view(b, self.num_kernels, self.out_chs, *ys.shape[-2:]))
            y = y + bias[:, :, None, None]
        else:
            w = (pi @ self.weight.flatten(1)).view(b, *self.weight.shape[1:])  # (B, Co, Ci, k, k)
            y = per_sample_conv2d(x, w, bias, stride=self.stride, padding=self.padding)
        return F.relu(self.bn(y)), pi.argmax(1)

    def cost(self) -> float:
        """FLOPs per sample: pooling + attention MLP + kernel/bias mixing + convolution + batch norm."""
        kernel = self.out_chs * self.in_chs * self.k * self.k
        hw_out = self.out_size * self.out_size
        attn = self.in_chs * self.in_size ** 2 + self.fc1.in_features * self.fc1.out_features \
            + self.fc2.in_features * self.num_kernels
        return float(attn + self.num_kernels * (kernel + self.out_chs) + kernel * hw_out + 2 * self.out_chs * hw_out)


@register_flops_rule(DynamicConv2d)
def _dynamic_conv_flops(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, DynamicConv2d)
    return m.cost() * inputs[0].shape[0]


def build_dynamic_conv_net(cfg: ConvNetConfig, *, num_kernels: int = 4, tau_start: float = 30.0,
                           tau_end: float = 1.0, anneal_fraction: float = 0.3) -> ParamConvNet:
    """The backbone CNN with every layer after the stem a dynamic convolution of ``num_kernels`` kernels."""
    schedule = TemperatureSchedule(start=tau_start, end=tau_end, kind="linear")
    return ParamConvNet(cfg, lambda **kw: DynamicConv2d(num_kernels=num_kernels, schedule=schedule,
                                                         anneal_fraction=anneal_fraction, **kw),
                        method="dynamic_conv")


@register_model
def dynamic_conv_mnist(*, num_kernels: int = 4, tau_start: float = 30.0, anneal_fraction: float = 0.3,
                       num_classes: int = 10, widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """28×28 (Fashion-)MNIST: stem 32 → DyConv 64 (stride 2) → DyConv 128 (stride 2) (or ``widths``)."""
    return build_dynamic_conv_net(dataset_config("mnist", num_classes=num_classes, widths=widths),
                                  num_kernels=num_kernels, tau_start=tau_start, anneal_fraction=anneal_fraction)


@register_model
def dynamic_conv_cifar10(*, num_kernels: int = 4, tau_start: float = 30.0, anneal_fraction: float = 0.3,
                         num_classes: int = 10, widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """32×32 CIFAR-10: stem 32 → DyConv 64, 128 (stride 2), 128 (or ``widths``)."""
    return build_dynamic_conv_net(dataset_config("cifar10", num_classes=num_classes, widths=widths),
                                  num_kernels=num_kernels, tau_start=tau_start, anneal_fraction=anneal_fraction)


@register_model
def test_dynamic_conv(*, num_kernels: int = 4, tau_start: float = 30.0, anneal_fraction: float = 0.3,
                      num_classes: int = 10) -> ParamConvNet:
    """Tiny variant for tests: 1×8×8 inputs, stem 4 → DyConv 8 → DyConv 8."""
    return build_dynamic_conv_net(ConvNetConfig(in_chans=1, input_size=8, num_classes=num_classes, widths=(4, 8, 8),
                                                strides=(1, 2, 1)), num_kernels=num_kernels, tau_start=tau_start,
                                  anneal_fraction=anneal_fraction)
