"""The per-sample cost ledger: what each sample actually paid for.

Every dynamic model charges the ledger for the pieces of computation it runs, *for the samples that ran them*.
In execute mode the charged indices are exactly the rows of the compacted sub-batch; in simulate mode the
model charges the same pieces from its hard decisions, so the two modes produce the same ledger (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CostLedger"]


@dataclass
class CostLedger:
    """Accumulates per-sample FLOPs (float64, exact for integer counts up to 2**53).

    Attributes:
        flops: per-sample FLOPs charged so far, shape (B,).
        by_part: per-sample FLOPs charged under each part name (e.g. ``"stage2"``, ``"exit1"``), shape (B,).
    """

    flops: torch.Tensor
    by_part: dict[str, torch.Tensor] = field(default_factory=dict)
    track_parts: bool = False

    @classmethod
    def zeros(cls, batch_size: int, *, device: torch.device | str | None = None, track_parts: bool = False
              ) -> CostLedger:
        return cls(torch.zeros(batch_size, dtype=torch.float64, device=device), track_parts=track_parts)

    def charge(self, flops: float | torch.Tensor, index: torch.Tensor | None = None, *, part: str = "") -> None:
        """Charge ``flops`` (a scalar or per-row tensor) to the samples in ``index`` (all samples if None)."""
        value = flops.to(torch.float64) if isinstance(flops, torch.Tensor) else float(flops)
        if index is None:
            self.flops += value
        else:
            if isinstance(value, float):
                value = torch.full((index.numel(),), value, dtype=torch.float64, device=self.flops.device)
            self.flops.index_add_(0, index, value)
        if self.track_parts and part:
            slot = self.by_part.setdefault(part, torch.zeros_like(self.flops))
            if index is None:
                slot += value
            else:
                slot.index_add_(0, index, value)  # type: ignore[arg-type]
