"""BlockDrop: a policy network looks at the image once and picks the residual blocks to run.

Paper: Z. Wu, T. Nagarajan, A. Kumar, S. Rennie, L. S. Davis, K. Grauman, R. Feris, "BlockDrop: Dynamic Inference
Paths in Residual Networks", CVPR 2018, arXiv:1711.08393.

A small policy network sees a downsampled copy of the input and outputs one Bernoulli probability per
shape-preserving block of a *pretrained* ResNet; all decisions are taken in one shot, before the ResNet runs, so
execute mode knows from the start which rows each block will receive. The policy is trained by REINFORCE
(:class:`~dynaneural.policies.ReinforceLoss`) with the paper's reward (Eq. 2)::

    R(u) = 1 − (|u|₁ / K)²   if the ResNet with blocks u is right,   −γ otherwise

(correctness, with a quadratic block-usage penalty), a self-critical baseline (the reward of the greedy policy
``p ≥ 0.5``) and the paper's bounded exploration (probabilities mixed with 0.5 by α). The backbone is frozen in
this stage, so each sampled path is run in *execute* mode: training the policy is itself cheaper than running the
full ResNet. :func:`train_blockdrop_policy` is that loop; :func:`blockdrop_joint_loss` is the objective of the
paper's optional joint fine-tuning (ResNet by cross-entropy on the sampled paths, policy by REINFORCE with a
moving-average baseline) for ``engine.train``.

Curriculum (the paper's Sec. 3.3, ``curriculum_epochs`` of :func:`train_blockdrop_policy`): the policy first
decides only the last block, every earlier block always runs; the number of blocks it decides grows by one at
even steps until, after ``curriculum_epochs`` epochs, it decides all K. Forced blocks add nothing to the
log-probability (``sample_bernoulli(free=...)``) and the greedy baseline is forced the same way. The paper grows
one block per epoch; here the ramp is spread over a chosen number of epochs (by optimizer step), because the
policy trains for only a handful of epochs on this CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.execution import Mode
from dynaneural.layers.blocks import ConvBNAct
from dynaneural.layers.resnet import AvgPoolTo, CifarResNet, CifarResNetConfig, ResNetCosts
from dynaneural.policies import Decision, PolicySample, ReinforceLoss, sample_bernoulli
from dynaneural.registry import register_model
from dynaneural.sample_wise.layer_skip.base import LayerSkipNetwork, LayerSkipOutput, module_flops

__all__ = ["BlockDrop", "BlockDropPolicy", "blockdrop_joint_loss", "blockdrop_reward", "curriculum_free_gates",
           "train_blockdrop_policy"]


class BlockDropPolicy(nn.Module):
    """The policy network: average-pool the image by ``downsample``, three strided conv-BN-ReLU layers, global
    pooling, linear → one logit per gated block."""

    def __init__(self, in_chans: int, num_gates: int, *, downsample: int = 2, widths: tuple[int, ...] = (16, 32, 64),
                 init_bias: float = 0.0) -> None:
        super().__init__()
        self.down: nn.Module = nn.AvgPool2d(downsample) if downsample > 1 else nn.Identity()
        layers, prev = [], in_chans
        for w in widths:
            layers.append(ConvBNAct(prev, w, stride=2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.pool = AvgPoolTo(1)
        self.fc = nn.Linear(prev, num_gates)
        nn.init.constant_(self.fc.bias, init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, G) logits
        return self.fc(self.pool(self.features(self.down(x))).flatten(1))


class BlockDrop(LayerSkipNetwork):
    """BlockDrop on a CIFAR ResNet (see the module docstring).

    Args:
        backbone: the (pretrained) ResNet.
        downsample: the policy sees the input average-pooled by this factor.
        exploration: α, the share of 0.5 mixed into the probabilities when sampling in train mode.
        init_bias: initial bias of the policy's logits (positive: start with the blocks on).
        threshold: inference threshold on the probability of "run" (0.5 = the paper's greedy policy).
    """

    def __init__(self, backbone: CifarResNet, *, downsample: int = 2, exploration: float = 0.2,
                 policy_widths: tuple[int, ...] = (16, 32, 64), init_bias: float = 0.0, threshold: float = 0.5) -> None:
        super().__init__(backbone, threshold=threshold)
        self.policy = BlockDropPolicy(backbone.config.in_chans, self.num_gates, downsample=downsample,
                                      widths=policy_widths, init_bias=init_bias)
        self.exploration = float(exploration)
        self._fixed: torch.Tensor | None = None

    @contextlib.contextmanager
    def fixed_actions(self, actions: torch.Tensor) -> Iterator[None]:
        """Run the next forwards with these (B, G) decisions instead of the policy's (the policy still runs and
        is paid for). Used to evaluate sampled and greedy paths during policy training."""
        before, self._fixed = self._fixed, actions
        try:
            yield
        finally:
            self._fixed = before

    def begin(self, x: torch.Tensor, mode: Mode) -> tuple[Any, PolicySample | None]:
        logits = self.policy(x)  # (B, G)
        prob = torch.sigmoid(logits)
        sample = None
        if self._fixed is not None:
            if self._fixed.shape != logits.shape:
                raise ValueError(f"fixed actions must have shape {tuple(logits.shape)}, got {tuple(self._fixed.shape)}")
            actions = self._fixed.to(logits.dtype)
        elif mode is Mode.TRAIN:
            sample = sample_bernoulli(logits, exploration=self.exploration)
            actions = sample.actions
        else:
            actions = (logits >= self.logit_cut()).to(logits.dtype)  # = prob >= threshold, saturation-safe
        return (logits, prob, actions), sample

    def gate_logit(self, k: int, h: torch.Tensor, state: Any, mode: Mode) -> tuple[torch.Tensor, Any]:
        return state[0][:, k], state

    def decide(self, k: int, logit: torch.Tensor, state: Any, mode: Mode) -> tuple[Decision, PolicySample | None]:
        _, prob, actions = state
        a = actions[:, k]
        return Decision(hard=a > 0.5, value=a, prob=prob[:, k]), None

    def decision_costs(self, net: ResNetCosts) -> tuple[float, tuple[float, ...]]:
        return module_flops(self.policy, *self.input_shape), (0.0,) * self.num_gates


def blockdrop_reward(correct: torch.Tensor, blocks_used: torch.Tensor, num_gates: int, *, penalty: float = 5.0
                     ) -> torch.Tensor:
    """The paper's reward: ``1 − (used / K)²`` where right, ``−penalty`` (γ) where wrong; (B,) float."""
    used = blocks_used.float() / num_gates
    return torch.where(correct, 1.0 - used ** 2, torch.full_like(used, -float(penalty)))


def curriculum_free_gates(step: int, *, total_steps: int, num_gates: int) -> int:
    """How many of the last gates the policy decides at ``step`` of a curriculum of ``total_steps`` steps: 1 at
    the start, one more at each of ``num_gates − 1`` even intervals, ``num_gates`` from ``total_steps`` on."""
    if total_steps <= 0:
        return num_gates
    return min(num_gates, 1 + (step * num_gates) // total_steps)


def train_blockdrop_policy(model: BlockDrop, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5,
                           batch_size: int = 256, lr: float = 1e-3, penalty: float = 5.0, entropy_coef: float = 0.0,
                           curriculum_epochs: float = 0.0, seed: int = 0, log: Callable[[str], None] | None = None
                           ) -> list[dict[str, float]]:
    """Train the policy with REINFORCE and a self-critical baseline; the ResNet stays frozen.

    Each step samples paths from the policy (with exploration α), runs the frozen ResNet on them in **execute**
    mode (only the chosen blocks are computed), and does the same for the greedy paths (the baseline). With
    ``curriculum_epochs > 0`` the policy decides only the last j blocks, j growing from 1 to K over that many
    epochs (:func:`curriculum_free_gates`; the others run). Returns one dict per epoch: mean reward, accuracy,
    blocks used (fraction), mean probability of "run" and the number of gates decided at the epoch's end
    (``free_gates``).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if not 0.0 <= curriculum_epochs <= epochs:
        raise ValueError(f"curriculum_epochs must be in [0, epochs={epochs}], got {curriculum_epochs}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rl = ReinforceLoss(baseline="self_critical", entropy_coef=entropy_coef)
    opt = torch.optim.Adam(model.policy.parameters(), lr=lr)
    model.eval()  # the ResNet (and the policy's batch norms) use running statistics: the backbone is frozen
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    g = model.num_gates
    history = []
    steps_per_epoch = -(-x.shape[0] // batch_size)
    ramp = round(curriculum_epochs * steps_per_epoch)
    gate_index = torch.arange(g, device=x.device)
    step, n_free = 0, g
    try:
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            totals = {"reward": 0.0, "accuracy": 0.0, "blocks": 0.0, "prob": 0.0}
            for i in range(0, x.shape[0], batch_size):
                idx = order[i:i + batch_size]
                xb, yb = x[idx], y[idx]
                logits = model.policy(xb)
                n_free = curriculum_free_gates(step, total_steps=ramp, num_gates=g)
                free = gate_index >= g - n_free  # the last n_free gates
                sample = sample_bernoulli(logits, exploration=model.exploration, free=free)
                greedy = torch.where(free, (torch.sigmoid(logits) >= 0.5).float(), 1.0)
                step += 1
                with torch.no_grad():
                    with model.fixed_actions(sample.actions.detach()):
                        right = model(xb, mode=Mode.EXECUTE).logits.argmax(1) == yb
                    with model.fixed_actions(greedy):
                        right_greedy = model(xb, mode=Mode.EXECUTE).logits.argmax(1) == yb
                reward = blockdrop_reward(right, sample.actions.sum(1), g, penalty=penalty)
                base = blockdrop_reward(right_greedy, greedy.sum(1), g, penalty=penalty)
                parts = rl(sample, reward, value=base)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
                totals["reward"] += float(reward.sum())
                totals["accuracy"] += float(right.float().sum())
                totals["blocks"] += float(sample.actions.sum()) / g
                totals["prob"] += float(torch.sigmoid(logits).detach().mean(1).sum())
            row = {"epoch": float(epoch + 1), **{k: v / x.shape[0] for k, v in totals.items()},
                   "free_gates": float(n_free)}
            history.append(row)
            if log is not None:
                log(f"blockdrop policy epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
    finally:
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    return history


def blockdrop_joint_loss(model: BlockDrop, *, penalty: float = 5.0, reinforce: ReinforceLoss | None = None
                         ) -> Callable[[LayerSkipOutput, torch.Tensor], dict[str, torch.Tensor]]:
    """Joint fine-tuning objective for ``engine.train``: cross-entropy for the ResNet on the sampled paths, and
    REINFORCE (moving-average baseline) with the paper's reward for the policy."""
    rl = reinforce if reinforce is not None else ReinforceLoss(baseline="moving_average")

    def loss_fn(out: LayerSkipOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out.logits, y)
        if out.policy is None:
            return {"loss": ce, "ce": ce.detach()}
        right = out.logits.argmax(1) == y
        reward = blockdrop_reward(right, out.policy.actions.sum(1), model.num_gates, penalty=penalty)
        parts = rl.train(model.training)(out.policy, reward)
        return {"loss": ce + parts["loss"], "ce": ce.detach(), "reward": reward.mean()}

    return loss_fn


def _blockdrop(cfg: CifarResNetConfig, **kwargs: Any) -> BlockDrop:
    return BlockDrop(CifarResNet(cfg), **kwargs)


@register_model
def blockdrop_resnet(*, widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 3, in_chans: int = 3,
                     input_size: int = 32, num_classes: int = 10, exploration: float = 0.2, downsample: int = 2,
                     policy_widths: tuple[int, ...] = (16, 32, 64), init_bias: float = 2.0) -> BlockDrop:
    """BlockDrop on a ResNet-(6n+2) (defaults: CIFAR, widths 16/32/64); the policy sees the input pooled by
    ``downsample`` (16×16 for CIFAR)."""
    return _blockdrop(CifarResNetConfig(widths=tuple(widths), blocks_per_stage=blocks_per_stage, in_chans=in_chans,
                                        input_size=input_size, num_classes=num_classes),
                      exploration=exploration, downsample=downsample, policy_widths=tuple(policy_widths),
                      init_bias=init_bias)


@register_model
def test_blockdrop(*, num_classes: int = 10) -> BlockDrop:
    """Tiny variant for tests: 3 stages of 2 blocks on 3×8×8 inputs; the policy sees a 4×4 copy."""
    return _blockdrop(CifarResNetConfig(input_size=8, widths=(4, 8, 8), blocks_per_stage=2, num_classes=num_classes),
                      policy_widths=(4, 8))

