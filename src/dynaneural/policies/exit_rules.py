"""Exit rules: when is a sample done?

Each rule turns what is known at an exit into a *score* (higher means more ready to stop); a sample leaves at
the first enabled exit whose score reaches that exit's threshold. Scores never depend on the thresholds, so a
validation pass can record the score matrix (N, K) once and calibration can choose thresholds offline.

* ``confidence`` — maximum softmax probability (BranchyNet uses entropy; MSDNet and SDN use max-softmax).
* ``entropy`` — ``1 - H(p) / log C``: 1 for a one-hot prediction, 0 for a uniform one (BranchyNet, Teerapittayanon
  et al., ICPR 2016).
* ``patience`` — number of consecutive exits, ending at this one, whose argmax agrees (PABEE, Zhou et al.,
  NeurIPS 2020, "BERT Loses Patience", arXiv:2006.04152), plus this exit's max-softmax probability in [0, 1) as
  a tie-break; threshold ``p + 1`` is PABEE's rule "the last p+1 exits agree", and fractional thresholds let
  calibration split the many samples that share an integer count (pure counts cannot meet most budgets).
* ``learned`` — the sigmoid of a small trained head that predicts whether this exit's prediction is already
  right (a learned exit policy in the spirit of the learned exits of the survey, Sec. 3.1).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "ExitRule", "ConfidenceRule", "EntropyRule", "PatienceRule", "LearnedRule", "ExitPolicyHead",
    "create_exit_rule", "EXIT_RULES",
]

State = dict[str, torch.Tensor]


class ExitRule(ABC):
    """Scores readiness to exit. Stateless rules ignore ``state``; stateful ones (patience) carry it per sample,
    and the model compacts it together with the features."""

    name: ClassVar[str]
    needs_policy: ClassVar[bool] = False

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {}

    @abstractmethod
    def score(self, logits: torch.Tensor, state: State, *, policy_logit: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, State]:
        """Return the (B,) float32 score at this exit and the updated state."""

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ConfidenceRule(ExitRule):
    name = "confidence"

    def score(self, logits: torch.Tensor, state: State, *, policy_logit: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, State]:
        return logits.float().softmax(-1).amax(-1), state


class EntropyRule(ExitRule):
    name = "entropy"

    def score(self, logits: torch.Tensor, state: State, *, policy_logit: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, State]:
        logp = logits.float().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return 1.0 - entropy / math.log(logits.shape[-1]), state


class PatienceRule(ExitRule):
    name = "patience"

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {"prev": torch.full((batch_size,), -1, dtype=torch.long, device=device),
                "count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def score(self, logits: torch.Tensor, state: State, *, policy_logit: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, State]:
        pred = logits.argmax(-1)
        count = torch.where(pred == state["prev"], state["count"] + 1, torch.ones_like(state["count"]))
        conf = logits.float().softmax(-1).amax(-1).clamp(max=1.0 - 1e-6)  # < 1 so counts never merge
        return count.float() + conf, {"prev": pred, "count": count}


class LearnedRule(ExitRule):
    name = "learned"
    needs_policy = True

    def score(self, logits: torch.Tensor, state: State, *, policy_logit: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, State]:
        if policy_logit is None:
            raise ValueError("the learned exit rule needs a model built with exit_policy=True")
        return torch.sigmoid(policy_logit.float()), state


class ExitPolicyHead(nn.Module):
    """Predicts from an exit's logits whether that exit is already right (trained with BCE on correctness).

    It sees the class probabilities sorted in decreasing order, which makes it class-agnostic: it learns the
    *shape* of a confident distribution, not which class is easy.
    """

    def __init__(self, num_classes: int, *, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B,)
        probs = logits.float().softmax(-1).sort(-1, descending=True).values
        return self.net(probs).squeeze(-1)


EXIT_RULES: dict[str, type[ExitRule]] = {
    r.name: r for r in (ConfidenceRule, EntropyRule, PatienceRule, LearnedRule)
}


def create_exit_rule(name: str | ExitRule | dict[str, Any]) -> ExitRule:
    """Build an exit rule by name (``confidence``, ``entropy``, ``patience``, ``learned``) or from its config."""
    if isinstance(name, ExitRule):
        return name
    if isinstance(name, dict):
        name = str(name.get("name"))
    try:
        return EXIT_RULES[name]()
    except KeyError:
        raise ValueError(f"unknown exit rule {name!r}; expected one of {sorted(EXIT_RULES)}") from None
