"""Discrete decisions and their differentiable relaxations — one implementation for every method.

A decision (run this block? exit here? which expert, which width, keep this token?) is made from logits.
At inference it is a hard choice (a threshold on the probability, or an argmax). In training it is relaxed:

* straight-through (Bengio et al., 2013, arXiv:1308.3432): the forward pass uses the hard choice, the
  backward pass the gradient of the probability;
* Gumbel-softmax / concrete (Jang et al., ICLR 2017, arXiv:1611.01144; Maddison et al., ICLR 2017,
  arXiv:1611.00712): add Gumbel noise to the logits and take a tempered softmax; ``hard=True`` returns the
  one-hot of the noisy argmax with the soft sample's gradient (straight-through Gumbel). For a binary gate the
  two-class case reduces to a sigmoid of ``(logit + logistic noise) / tau`` (used by ConvNet-AIG);
* a temperature schedule anneals ``tau`` over training.

:class:`Decision` bundles the result so a model can use the hard value to gather rows in execute mode, the
relaxed value to weight outputs in train mode, and the probability for budget losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Decision", "TemperatureSchedule", "binary_decision", "categorical_decision", "gumbel_sigmoid",
           "gumbel_softmax", "straight_through"]


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    return soft + (hard.to(soft.dtype) - soft).detach()


def _logistic_noise(shape: torch.Size, *, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device="cpu" if generator is not None else
                   like.device).to(like.device)
    eps = torch.finfo(like.dtype).tiny
    return torch.log(u + eps) - torch.log1p(-u + eps)


def gumbel_sigmoid(logits: torch.Tensor, *, tau: float = 1.0, hard: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary concrete sample of a gate with logit ``logits``; hard values are {0, 1} with straight-through
    gradients. The difference of two Gumbels is logistic, so this is the two-class Gumbel-softmax."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    soft = torch.sigmoid((logits + _logistic_noise(logits.shape, like=logits, generator=generator)) / tau)
    return straight_through((soft > 0.5), soft) if hard else soft


def gumbel_softmax(logits: torch.Tensor, *, tau: float = 1.0, hard: bool = True, dim: int = -1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-softmax sample over ``dim`` (one-hot with straight-through gradients when ``hard``)."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype,
                   device="cpu" if generator is not None else logits.device).to(logits.device)
    tiny = torch.finfo(logits.dtype).tiny
    g = -torch.log(-torch.log(u + tiny) + tiny)
    soft = F.softmax((logits + g) / tau, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim, keepdim=True)
    return straight_through(torch.zeros_like(soft).scatter_(dim, index, 1.0), soft)


@dataclass(frozen=True)
class Decision:
    """A batch of decisions.

    Attributes:
        hard: the discrete choice — (B,) bool for a binary gate, (B,) int64 for a categorical one. This is what
            execute mode gathers rows by, and what simulate mode masks with.
        value: what to multiply outputs by in train mode: the relaxed, differentiable choice (a float in [0, 1],
            or one-hot (B, K)); equal to ``hard`` as floats outside train mode.
        prob: the model's probability of "on" (binary, (B,)) or over choices (categorical, (B, K)); for budget
            losses and REINFORCE.
    """

    hard: torch.Tensor
    value: torch.Tensor
    prob: torch.Tensor


Relaxation = Literal["hard", "straight_through", "gumbel"]


def binary_decision(logits: torch.Tensor, *, training: bool, relaxation: Relaxation = "gumbel", tau: float = 1.0,
                    threshold: float = 0.5, generator: torch.Generator | None = None) -> Decision:
    """A binary gate from logits (B,).

    At inference (``training=False``) the gate is on where ``sigmoid(logit) >= threshold`` — the threshold is
    what calibration moves to meet a budget. In training it is relaxed as asked: ``straight_through`` (hard
    threshold forward, sigmoid gradient), ``gumbel`` (straight-through Gumbel-sigmoid at temperature ``tau``)
    or ``hard`` (no gradient through the gate).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    prob = torch.sigmoid(logits)
    # Compare logits, not probabilities: a saturated sigmoid (exactly 1.0 in float32) would ignore a threshold
    # near 1, and calibration could then not reach low budgets.
    cut = math.inf if threshold >= 1.0 else (-math.inf if threshold <= 0.0 else math.log(threshold / (1 - threshold)))
    if not training or relaxation == "hard":
        hard = logits >= cut
        return Decision(hard=hard, value=hard.to(logits.dtype), prob=prob)
    if relaxation == "straight_through":
        hard = logits >= cut
        return Decision(hard=hard, value=straight_through(hard, prob), prob=prob)
    if relaxation == "gumbel":
        value = gumbel_sigmoid(logits, tau=tau, hard=True, generator=generator)
        return Decision(hard=value.detach() > 0.5, value=value, prob=prob)
    raise ValueError(f"unknown relaxation {relaxation!r}; expected 'hard', 'straight_through' or 'gumbel'")


def categorical_decision(logits: torch.Tensor, *, training: bool, relaxation: Relaxation = "gumbel",
                         tau: float = 1.0, generator: torch.Generator | None = None) -> Decision:
    """A choice among K options from logits (B, K): argmax at inference, relaxed one-hot in training."""
    prob = F.softmax(logits, dim=-1)
    if not training or relaxation == "hard":
        hard = prob.argmax(-1)
        return Decision(hard=hard, value=F.one_hot(hard, logits.shape[-1]).to(logits.dtype), prob=prob)
    if relaxation == "straight_through":
        hard = prob.argmax(-1)
        return Decision(hard=hard, value=straight_through(F.one_hot(hard, logits.shape[-1]), prob), prob=prob)
    if relaxation == "gumbel":
        value = gumbel_softmax(logits, tau=tau, hard=True, generator=generator)
        return Decision(hard=value.detach().argmax(-1), value=value, prob=prob)
    raise ValueError(f"unknown relaxation {relaxation!r}; expected 'hard', 'straight_through' or 'gumbel'")


@dataclass(frozen=True)
class TemperatureSchedule:
    """Temperature ``tau`` as a function of training progress p in [0, 1].

    Attributes:
        start: tau at p = 0.
        end: tau at p = 1.
        kind: ``constant`` (always ``start``), ``linear``, ``exponential`` (geometric from start to end, as the
            Gumbel-softmax paper anneals) or ``cosine``.
    """

    start: float = 1.0
    end: float = 1.0
    kind: Literal["constant", "linear", "exponential", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"temperatures must be positive, got start={self.start}, end={self.end}")
        if self.kind not in ("constant", "linear", "exponential", "cosine"):
            raise ValueError(f"unknown schedule kind {self.kind!r}")

    def __call__(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** p
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * p))
