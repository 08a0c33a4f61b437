"""Budget regularisers: pull a model's expected compute toward a target, usable by any decision.

Every dynamic model can report its *expected* cost in train mode as a differentiable per-sample quantity
(e.g. the sum over blocks of gate probability × block FLOPs, the expected halting step, the fraction of kept
tokens). :class:`BudgetLoss` turns that into a loss:

* ``squared`` — ``(mean_cost / total - target)^2`` (DynamicViT's ratio loss; SkipNet/AIG-style compute
  targets);
* ``hinge`` — only penalise spending above the target, ``relu(mean - target)^2``;
* ``per_gate`` — ConvNet-AIG's target-rate loss (Veit & Belongie, ECCV 2018, arXiv:1711.11503): each gate's
  batch-mean execution rate is pulled to the target separately, ``mean_l (rate_l - t)^2``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["BudgetLoss"]


class BudgetLoss(nn.Module):
    """A compute-target regulariser.

    Args:
        target: the target fraction of the full cost, in (0, 1].
        weight: the loss weight.
        kind: ``squared``, ``hinge`` or ``per_gate`` (see the module docstring).
    """

    def __init__(self, *, target: float, weight: float = 1.0,
                 kind: Literal["squared", "hinge", "per_gate"] = "squared") -> None:
        super().__init__()
        if not (0.0 < target <= 1.0):
            raise ValueError(f"budget target must be a fraction in (0, 1], got {target}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if kind not in ("squared", "hinge", "per_gate"):
            raise ValueError(f"unknown budget loss kind {kind!r}")
        self.target, self.weight, self.kind = float(target), float(weight), kind

    def forward(self, expected_cost: torch.Tensor, full_cost: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``expected_cost``: (B,) per-sample expected cost (for ``squared``/``hinge``), or (B, L) per-gate
        execution probabilities (for ``per_gate``; ``full_cost`` is then ignored)."""
        if self.kind == "per_gate":
            if expected_cost.dim() != 2:
                raise ValueError("per_gate expects (B, L) gate probabilities")
            rate = expected_cost.mean(0)
            return self.weight * ((rate - self.target) ** 2).mean()
        frac = expected_cost.mean() / full_cost
        gap = frac - self.target
        if self.kind == "hinge":
            gap = torch.relu(gap)
        return self.weight * gap ** 2
