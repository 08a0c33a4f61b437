"""REINFORCE (Williams, Machine Learning 1992) for discrete decisions, with a baseline and an entropy bonus.

Used wherever a decision is not differentiable and not relaxed: BlockDrop's one-shot block selection (Wu et
al., CVPR 2018, arXiv:1711.08393), SkipNet's hybrid RL stage (Wang et al., ECCV 2018, arXiv:1711.09485),
LSTM-Jump (Yu et al., ACL 2017, arXiv:1704.06877), AdaFrame (Wu et al., CVPR 2019, arXiv:1811.12432) and
GFNet's patch policy (Wang et al., NeurIPS 2020, arXiv:2010.05300).

The surrogate loss is ``-(R - b) * log pi(a) - beta * H(pi)`` averaged over samples, where ``b`` is a
baseline that reduces variance without biasing the gradient: a moving average of rewards, a learned value
(trained by squared error, returned as its own loss), or the self-critical reward of the greedy action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PolicySample", "ReinforceLoss", "sample_bernoulli", "sample_categorical"]


@dataclass(frozen=True)
class PolicySample:
    """Actions drawn from a policy: ``actions`` (B, ...), summed ``log_prob`` (B,), summed ``entropy`` (B,)."""

    actions: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor


def sample_bernoulli(logits: torch.Tensor, *, greedy: bool = False, generator: torch.Generator | None = None,
                     exploration: float = 0.0, free: torch.Tensor | None = None) -> PolicySample:
    """Independent Bernoulli actions for logits (B, K) (or (B,)): log-probability and entropy summed over K.

    ``exploration`` in [0, 1) mixes the probabilities with 0.5 (BlockDrop's alpha-bounded exploration keeps
    every block's probability away from 0 and 1).

    ``free`` (bool, broadcastable to ``logits``; None = all) marks the decisions the policy takes; the others are
    forced to 1 and add nothing to the log-probability or the entropy, so no gradient reaches their logits
    (BlockDrop's curriculum: the policy first decides only the last blocks, the earlier ones always run).
    """
    if free is not None:
        if free.dtype != torch.bool:
            raise ValueError(f"free must be a bool mask, got {free.dtype}")
        try:
            free = torch.broadcast_to(free.to(logits.device), logits.shape)
        except RuntimeError as e:
            raise ValueError(f"free {tuple(free.shape)} does not broadcast to logits {tuple(logits.shape)}") from e
    p = torch.sigmoid(logits)
    if exploration:
        p = p * (1 - exploration) + 0.5 * exploration
    if greedy:
        a = (p >= 0.5).to(logits.dtype)
    else:
        u = torch.rand(p.shape, generator=generator, device="cpu" if generator is not None else p.device)
        a = (u.to(p.device) < p).to(logits.dtype)
    eps = 1e-7
    logp = a * torch.log(p + eps) + (1 - a) * torch.log1p(-p + eps)
    ent = -(p * torch.log(p + eps) + (1 - p) * torch.log1p(-p + eps))
    if free is not None:
        a = torch.where(free, a, torch.ones_like(a))
        logp, ent = logp * free, ent * free
    if logits.dim() > 1:
        logp, ent = logp.flatten(1).sum(1), ent.flatten(1).sum(1)
    return PolicySample(actions=a, log_prob=logp, entropy=ent)


def sample_categorical(logits: torch.Tensor, *, greedy: bool = False,
                       generator: torch.Generator | None = None) -> PolicySample:
    """One categorical action per row of logits (B, K)."""
    logp_all = F.log_softmax(logits, dim=-1)
    if greedy:
        a = logp_all.argmax(-1)
    else:
        a = torch.multinomial(logp_all.exp().cpu() if generator is not None else logp_all.exp(), 1,
                              generator=generator).squeeze(-1).to(logits.device)
    logp = logp_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return PolicySample(actions=a, log_prob=logp, entropy=ent)


class ReinforceLoss(nn.Module):
    """Policy-gradient surrogate with a baseline and an entropy bonus.

    Args:
        baseline: ``moving_average`` (exponential average of the batch-mean reward, kept in a buffer so it is
            checkpointed), ``learned`` (pass ``value`` predictions (B,) to ``forward``; their squared error is
            returned as ``baseline_loss``), ``self_critical`` (pass the greedy action's reward as ``value``)
            or ``none``.
        momentum: moving-average momentum.
        entropy_coef: weight of the entropy bonus (``beta``).
        normalize: divide advantages by their batch standard deviation.
    """

    def __init__(self, *, baseline: Literal["moving_average", "learned", "self_critical", "none"] = "moving_average",
                 momentum: float = 0.9, entropy_coef: float = 0.0, normalize: bool = False) -> None:
        super().__init__()
        if baseline not in ("moving_average", "learned", "self_critical", "none"):
            raise ValueError(f"unknown baseline {baseline!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        self.baseline, self.momentum, self.entropy_coef, self.normalize = baseline, momentum, entropy_coef, normalize
        self.register_buffer("running_reward", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, sample: PolicySample, reward: torch.Tensor, *, value: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (policy + entropy + baseline terms), ``policy_loss``, ``baseline_loss``,
        ``entropy`` and ``advantage`` (B,). ``reward`` (B,) is treated as a constant."""
        reward = reward.detach().to(sample.log_prob.dtype)
        if self.baseline == "moving_average":
            b = self.running_reward.expand_as(reward)
            if self.training:
                mean = reward.mean()
                with torch.no_grad():
                    if bool(self.initialized):
                        self.running_reward.mul_(self.momentum).add_((1 - self.momentum) * mean)
                    else:
                        self.running_reward.copy_(mean)
                        self.initialized.fill_(True)
                        b = mean.expand_as(reward)  # first batch: baseline = its own mean
        elif self.baseline in ("learned", "self_critical"):
            if value is None:
                raise ValueError(f"baseline={self.baseline!r} needs value= (B,) predictions")
            b = value
        else:
            b = torch.zeros_like(reward)
        adv = reward - b.detach()
        if self.normalize and adv.numel() > 1:
            adv = adv / (adv.std() + 1e-6)
        policy_loss = -(adv * sample.log_prob).mean()
        entropy = sample.entropy.mean()
        baseline_loss = F.mse_loss(value, reward) if (self.baseline == "learned" and value is not None) else \
            torch.zeros((), device=reward.device)
        loss = policy_loss - self.entropy_coef * entropy + baseline_loss
        return {"loss": loss, "policy_loss": policy_loss.detach(), "baseline_loss": baseline_loss.detach(),
                "entropy": entropy.detach(), "advantage": adv.detach()}
