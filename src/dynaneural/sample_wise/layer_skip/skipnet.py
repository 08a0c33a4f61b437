"""SkipNet: gates that read a block's input and decide whether to run it.

Paper: X. Wang, F. Yu, Z.-Y. Dou, T. Darrell, J. E. Gonzalez, "SkipNet: Learning Dynamic Routing in Convolutional
Networks", ECCV 2018, arXiv:1711.09485.

Two gate designs of the paper:

* ``ff`` — a feed-forward gate per block (the paper's FFGate-II): average-pool the block's input to a small map,
  one 3×3 conv-BN-ReLU, a linear layer to one logit;
* ``rnn`` — the recurrent gate (RNNGate): global average pooling, a per-block linear projection to ``d`` = 10, one
  LSTM cell *shared by all blocks* whose state is carried from gate to gate, a linear layer to one logit. It is
  the paper's cheap choice (its cost is negligible next to a block).

Hybrid learning, as in the paper (Sec. 3.3):

1. ``phase="supervised"`` — supervised pre-training: the gate is hard (``p ≥ 0.5``) in the forward pass and its
   probability carries the gradient (straight-through), trained with the classification loss; an optional budget
   term (:class:`~dynaneural.policies.BudgetLoss` on the expected FLOPs) starts the skipping early;
2. ``phase="rl"`` — the gates *sample* their decisions (Bernoulli) and are trained by REINFORCE
   (:class:`~dynaneural.policies.ReinforceLoss`) with the reward ``−CE(x) − λ · cost(x) / full cost``
   (correctness minus a compute penalty, the paper's ``R = −λ·C``), while the network is trained on the same
   sampled paths by cross-entropy: :func:`skipnet_hybrid_loss` is that objective for ``engine.train``.

At inference a block runs where ``p ≥ threshold`` (0.5 in the paper; :meth:`~LayerSkipNetwork.calibrate` moves it
to a FLOPs budget).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.execution import Mode
from dynaneural.layers.blocks import ConvBNAct
from dynaneural.layers.resnet import AvgPoolTo, CifarResNet, CifarResNetConfig, ResNetCosts
from dynaneural.policies import (
    BudgetLoss,
    Decision,
    PolicySample,
    ReinforceLoss,
    binary_decision,
    sample_bernoulli,
)
from dynaneural.registry import register_model
from dynaneural.sample_wise.layer_skip.base import LayerSkipNetwork, LayerSkipOutput, module_flops

__all__ = ["FeedforwardGate", "RecurrentGate", "SkipNet", "skipnet_hybrid_loss"]


class FeedforwardGate(nn.Module):
    """FFGate-II: pool to ``pool``×``pool``, 3×3 conv-BN-ReLU, linear → one logit per sample."""

    def __init__(self, channels: int, *, pool: int = 2, init_bias: float = 0.0) -> None:
        super().__init__()
        self.pool = AvgPoolTo(pool)
        self.conv = ConvBNAct(channels, channels)
        self.fc = nn.Linear(channels * pool * pool, 1)
        nn.init.constant_(self.fc.bias, init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B,)
        return self.fc(self.conv(self.pool(h)).flatten(1)).squeeze(1)


class RecurrentGate(nn.Module):
    """RNNGate: per-block projection of the pooled input, one LSTM cell shared by every gate, linear → logit."""

    def __init__(self, channels: tuple[int, ...], *, hidden: int = 10, init_bias: float = 0.0) -> None:
        super().__init__()
        self.pool = AvgPoolTo(1)
        self.proj = nn.ModuleList(nn.Linear(c, hidden) for c in channels)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.fc = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc.bias, init_bias)

    def forward(self, h: torch.Tensor, k: int, state: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        z = self.proj[k](self.pool(h).flatten(1))  # (B, d)
        hx, cx = self.cell(z, state)
        return self.fc(hx).squeeze(1), (hx, cx)


class SkipNet(LayerSkipNetwork):
    """SkipNet on a CIFAR ResNet (see the module docstring).

    Args:
        backbone: the ResNet.
        gate: ``ff`` (a feed-forward gate per block) or ``rnn`` (the shared recurrent gate).
        phase: ``supervised`` (straight-through gates) or ``rl`` (sampled gates, REINFORCE via
            :func:`skipnet_hybrid_loss`); only matters in train mode.
        budget: optional target fraction of the full FLOPs for the supervised stage's budget term.
        budget_weight: its weight.
        init_bias: initial bias of the gates' last layer (positive: start with most blocks on).
        exploration: in the RL stage, mix the gate probabilities with 0.5 by this share (keeps exploring).
        threshold: inference threshold on the probability of "run".
    """

    def __init__(self, backbone: CifarResNet, *, gate: Literal["ff", "rnn"] = "rnn",
                 phase: Literal["supervised", "rl"] = "supervised", budget: float | None = None,
                 budget_weight: float = 1.0, init_bias: float = 0.0, exploration: float = 0.0,
                 gate_pool: int = 2, rnn_hidden: int = 10, threshold: float = 0.5) -> None:
        super().__init__(backbone, threshold=threshold)
        if gate not in ("ff", "rnn"):
            raise ValueError(f"gate must be 'ff' or 'rnn', got {gate!r}")
        self.gate_kind = gate
        self.phase = phase
        self.exploration = float(exploration)
        self.budget_on_decisions = True  # the budget term charges the blocks the straight-through gates run
        chans = tuple(backbone.blocks[i].conv1[0].in_channels for i in self.gate_blocks)
        if gate == "ff":
            self.gates = nn.ModuleList(FeedforwardGate(c, pool=gate_pool, init_bias=init_bias) for c in chans)
        else:
            self.rnn_gate = RecurrentGate(chans, hidden=rnn_hidden, init_bias=init_bias)
        self.budget_loss = BudgetLoss(target=budget, weight=budget_weight, kind="squared") if budget else None

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in ("supervised", "rl"):
            raise ValueError(f"phase must be 'supervised' or 'rl', got {value!r}")
        self._phase = value

    def gate_logit(self, k: int, h: torch.Tensor, state: Any, mode: Mode) -> tuple[torch.Tensor, Any]:
        if self.gate_kind == "ff":
            return self.gates[k](h), state
        return self.rnn_gate(h, k, state)

    def decide(self, k: int, logit: torch.Tensor, state: Any, mode: Mode) -> tuple[Decision, PolicySample | None]:
        if mode is not Mode.TRAIN:
            return self.threshold_decision(logit), None
        if self.phase == "supervised":
            return binary_decision(logit, training=True, relaxation="straight_through", threshold=0.5), None
        s = sample_bernoulli(logit, exploration=self.exploration)
        return Decision(hard=s.actions > 0.5, value=s.actions, prob=torch.sigmoid(logit)), s

    def decision_costs(self, net: ResNetCosts) -> tuple[float, tuple[float, ...]]:
        shapes = [net.block_inputs[i] for i in self.gate_blocks]
        if self.gate_kind == "ff":
            return 0.0, tuple(module_flops(g, *s) for g, s in zip(self.gates, shapes, strict=True))
        return 0.0, tuple(module_flops(_OneRecurrentGate(self.rnn_gate, k), *s) for k, s in enumerate(shapes))

    def extra_losses(self, out: LayerSkipOutput) -> dict[str, torch.Tensor]:
        if self.budget_loss is None or self.phase != "supervised" or out.expected_cost is None:
            return {}
        return {"budget": self.budget_loss(out.expected_cost, self.costs().static_total)}


class _OneRecurrentGate(nn.Module):
    """Gate k of a RecurrentGate as a one-argument module, for the FLOPs counter."""

    def __init__(self, gate: RecurrentGate, k: int) -> None:
        super().__init__()
        self.gate, self.k = gate, k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(h, self.k, None)[0]


def skipnet_hybrid_loss(model: SkipNet, *, cost_weight: float = 0.5, reinforce: ReinforceLoss | None = None
                        ) -> Callable[[LayerSkipOutput, torch.Tensor], dict[str, torch.Tensor]]:
    """SkipNet's hybrid RL objective for ``engine.train`` (``phase="rl"``).

    The network is trained by cross-entropy on the sampled paths; the gates by REINFORCE with the per-sample reward
    ``−CE − cost_weight · cost / full cost`` (the cost is what the ledger charged for the sampled path, gates
    included). Returns a dict with ``loss`` and its parts.
    """
    rl = reinforce if reinforce is not None else ReinforceLoss(baseline="moving_average", entropy_coef=1e-3)
    full = model.costs().static_total

    def loss_fn(out: LayerSkipOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out.logits, y, reduction="none")
        if out.policy is None:  # supervised phase or all_on: plain cross-entropy
            return {"loss": ce.mean(), "ce": ce.mean().detach()}
        reward = -ce.detach() - cost_weight * out.cost.to(ce.dtype) / full
        parts = rl.train(model.training)(out.policy, reward)
        return {"loss": ce.mean() + parts["loss"], "ce": ce.mean().detach(), "policy": parts["policy_loss"],
                "reward": reward.mean()}

    return loss_fn


def _skipnet(cfg: CifarResNetConfig, **kwargs: Any) -> SkipNet:
    return SkipNet(CifarResNet(cfg), **kwargs)


@register_model
def skipnet_resnet(*, widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 3, in_chans: int = 3,
                   input_size: int = 32, num_classes: int = 10, gate: Literal["ff", "rnn"] = "rnn",
                   budget: float | None = None, budget_weight: float = 1.0, exploration: float = 0.1,
                   init_bias: float = 2.0) -> SkipNet:
    """SkipNet on a ResNet-(6n+2) (defaults: CIFAR, widths 16/32/64; n = 3: ResNet-20, 5: ResNet-32)."""
    return _skipnet(CifarResNetConfig(widths=tuple(widths), blocks_per_stage=blocks_per_stage, in_chans=in_chans,
                                      input_size=input_size, num_classes=num_classes),
                    gate=gate, budget=budget, budget_weight=budget_weight, exploration=exploration,
                    init_bias=init_bias)


@register_model
def test_skipnet_ff(*, num_classes: int = 10) -> SkipNet:
    """Tiny variant for tests: feed-forward gates, 3 stages of 2 blocks on 3×8×8 inputs."""
    return _skipnet(CifarResNetConfig(input_size=8, widths=(4, 8, 8), blocks_per_stage=2, num_classes=num_classes),
                    gate="ff", budget=0.7)


@register_model
def test_skipnet_rnn(*, num_classes: int = 10) -> SkipNet:
    """Tiny variant for tests: the recurrent gate, 3 stages of 2 blocks on 3×8×8 inputs."""
    return _skipnet(CifarResNetConfig(input_size=8, widths=(4, 8, 8), blocks_per_stage=2, num_classes=num_classes),
                    gate="rnn", budget=0.7)
