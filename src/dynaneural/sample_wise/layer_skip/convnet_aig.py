"""ConvNet-AIG: adaptive inference graphs with Gumbel gates and a target-rate loss.

Paper: A. Veit, S. Belongie, "Convolutional Networks with Adaptive Inference Graphs", ECCV 2018,
arXiv:1711.11503.

Every shape-preserving residual block gets a light gate (Sec. 3.1): global average pooling of the block's input,
a linear layer to ``hidden`` = 16 units with batch norm and ReLU, a linear layer to the logit of "run". In
training the gate is a straight-through Gumbel sample (the paper's Gumbel-softmax over {skip, run}, which for two
classes is :func:`~dynaneural.policies.gumbel_sigmoid`), so the forward pass is discrete and the gradient flows
to the gate through the relaxation; the temperature follows a :class:`~dynaneural.policies.TemperatureSchedule`
(the paper keeps τ = 1). The target-rate loss (Sec. 3.3) pulls each gate's batch execution rate to the target
``t``: ``mean_l (rate_l − t)²`` — :class:`~dynaneural.policies.BudgetLoss` with ``kind="per_gate"``, computed
on the straight-through gate values, as in the paper. At inference the gate is deterministic (``p ≥ 0.5``, or the
calibrated threshold).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynaneural.execution import Mode
from dynaneural.layers.resnet import AvgPoolTo, CifarResNet, CifarResNetConfig, ResNetCosts
from dynaneural.policies import BudgetLoss, Decision, PolicySample, TemperatureSchedule, binary_decision
from dynaneural.registry import register_model
from dynaneural.sample_wise.layer_skip.base import LayerSkipNetwork, LayerSkipOutput, module_flops

__all__ = ["AIGGate", "ConvNetAIG"]


class AIGGate(nn.Module):
    """Global average pool, linear-BN-ReLU to ``hidden`` units, linear → one logit per sample."""

    def __init__(self, channels: int, *, hidden: int = 16, init_bias: float = 0.0) -> None:
        super().__init__()
        self.pool = AvgPoolTo(1)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B,)
        return self.fc2(self.act(self.bn(self.fc1(self.pool(h).flatten(1))))).squeeze(1)


class ConvNetAIG(LayerSkipNetwork):
    """ConvNet-AIG on a CIFAR ResNet (see the module docstring).

    Args:
        backbone: the ResNet.
        target_rate: the target execution rate ``t`` of every gate.
        rate_weight: weight of the target-rate loss (the paper uses 2 on CIFAR's ResNet-110).
        tau: temperature schedule of the Gumbel relaxation over training progress.
        hidden: units of the gate's hidden layer.
        init_bias: initial bias of the gates' logits (positive: start with the blocks on).
        threshold: inference threshold on the probability of "run".
    """

    def __init__(self, backbone: CifarResNet, *, target_rate: float = 0.6, rate_weight: float = 2.0,
                 tau: TemperatureSchedule | None = None, hidden: int = 16, init_bias: float = 0.0,
                 threshold: float = 0.5) -> None:
        super().__init__(backbone, threshold=threshold)
        chans = tuple(backbone.blocks[i].conv1[0].in_channels for i in self.gate_blocks)
        self.gates = nn.ModuleList(AIGGate(c, hidden=hidden, init_bias=init_bias) for c in chans)
        self.rate_loss = BudgetLoss(target=target_rate, weight=rate_weight, kind="per_gate")
        self.tau_schedule = tau if tau is not None else TemperatureSchedule(1.0, 1.0)
        self.tau = self.tau_schedule(0.0)

    def set_train_progress(self, progress: float) -> None:
        self.tau = self.tau_schedule(progress)

    def gate_logit(self, k: int, h: torch.Tensor, state: Any, mode: Mode) -> tuple[torch.Tensor, Any]:
        return self.gates[k](h), state

    def decide(self, k: int, logit: torch.Tensor, state: Any, mode: Mode) -> tuple[Decision, PolicySample | None]:
        if mode is Mode.TRAIN:
            return binary_decision(logit, training=True, relaxation="gumbel", tau=self.tau), None
        return self.threshold_decision(logit), None

    def decision_costs(self, net: ResNetCosts) -> tuple[float, tuple[float, ...]]:
        shapes = [net.block_inputs[i] for i in self.gate_blocks]
        return 0.0, tuple(module_flops(g, *s) for g, s in zip(self.gates, shapes, strict=True))

    def extra_losses(self, out: LayerSkipOutput) -> dict[str, torch.Tensor]:
        assert out.gate_value is not None
        return {"target_rate": self.rate_loss(out.gate_value)}  # (B, G) straight-through gate values


def _aig(cfg: CifarResNetConfig, **kwargs: Any) -> ConvNetAIG:
    return ConvNetAIG(CifarResNet(cfg), **kwargs)


@register_model
def aig_resnet(*, widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 3, in_chans: int = 3,
               input_size: int = 32, num_classes: int = 10, target_rate: float = 0.6, rate_weight: float = 2.0,
               tau_start: float = 1.0, tau_end: float = 1.0, init_bias: float = 2.0) -> ConvNetAIG:
    """ConvNet-AIG on a ResNet-(6n+2) (defaults: CIFAR, widths 16/32/64; n = 3: ResNet-20, 5: ResNet-32)."""
    return _aig(CifarResNetConfig(widths=tuple(widths), blocks_per_stage=blocks_per_stage, in_chans=in_chans,
                                  input_size=input_size, num_classes=num_classes),
                target_rate=target_rate, rate_weight=rate_weight, init_bias=init_bias,
                tau=TemperatureSchedule(tau_start, tau_end, "constant" if tau_start == tau_end else "exponential"))


@register_model
def test_convnet_aig(*, num_classes: int = 10) -> ConvNetAIG:
    """Tiny variant for tests: 3 stages of 2 blocks on 3×8×8 inputs; gates start near p = 0.5."""
    return _aig(CifarResNetConfig(input_size=8, widths=(4, 8, 8), blocks_per_stage=2, num_classes=num_classes))
