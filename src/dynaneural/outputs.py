"""Typed outputs shared by every dynamic model (structured results instead of side effects)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynaneural.execution import Mode

__all__ = ["DynamicOutput", "EarlyExitOutput"]


@dataclass
class DynamicOutput:
    """What a dynamic forward pass returns.

    Attributes:
        logits: final prediction of every sample, (B, C), in the input order.
        cost: FLOPs each sample actually paid, (B,) float64 — the cost ledger's total.
        decisions: the per-sample decisions taken, by name (e.g. ``"exit"``: (B,) exit index).
        mode: the mode the forward ran in.
        aux_losses: auxiliary losses to add to the task loss (budget, balance, ponder...), by name.
        cost_by_part: per-sample FLOPs by part when the model was asked to track them.
    """

    logits: torch.Tensor
    cost: torch.Tensor
    decisions: dict[str, torch.Tensor]
    mode: Mode
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    cost_by_part: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EarlyExitOutput(DynamicOutput):
    """Output of a multi-exit network.

    Attributes:
        exit_logits: logits of every exit, each (B, C); only in train and simulate mode, where every exit is
            computed for every sample (``None`` in execute mode, where they are not).
        exit_scores: the exit rule's score at each exit, (B, K); simulate mode only (NaN where not applicable).
        policy_logits: learned exit-policy logits per intermediate exit, each (B,); train/simulate mode with a
            learned policy only.
        reached_scores: per exit, the exit rule's scores of the samples that reached that exit and were scored
            there, in no particular order (``None`` where no score was computed: a disabled exit, the last one);
            simulate and execute mode. Label-free feedback for :class:`~dynaneural.calibration.ExitBudgetController`.
    """

    exit_logits: list[torch.Tensor] | None = None
    exit_scores: torch.Tensor | None = None
    policy_logits: list[torch.Tensor] | None = None
    reached_scores: list[torch.Tensor | None] | None = None

    @property
    def exit_index(self) -> torch.Tensor:
        """(B,) index of the exit each sample left at (K-1 = the final classifier)."""
        return self.decisions["exit"]
