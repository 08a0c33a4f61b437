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

    _flops: torch.Tensor
    by_part: dict[str, torch.Tensor] = field(default_factory=dict)
    track_parts: bool = False
    # Scalar charges are kept as numbers until read: one pending sum for every row, one for the current sub-batch
    # (the same index tensor charged stage after stage), so a stage costs no tensor op for the ledger.
    _common: float = 0.0
    _pending_index: torch.Tensor | None = None
    _pending: float = 0.0

    @property
    def flops(self) -> torch.Tensor:
        self._flush()
        if self._common:
            self._flops += self._common
            self._common = 0.0
        return self._flops

    def _flush(self) -> None:
        if self._pending_index is not None and self._pending:
            idx = self._pending_index
            self._flops.index_add_(0, idx, torch.full((idx.numel(),), self._pending, dtype=torch.float64,
                                                      device=self._flops.device))
        self._pending_index, self._pending = None, 0.0

    @classmethod
    def zeros(cls, batch_size: int, *, device: torch.device | str | None = None, track_parts: bool = False
              ) -> CostLedger:
        return cls(torch.zeros(batch_size, dtype=torch.float64, device=device), track_parts=track_parts)

    def charge(self, flops: float | torch.Tensor, index: torch.Tensor | None = None, *, part: str = "") -> None:
        """Charge ``flops`` (a scalar or per-row tensor) to the samples in ``index`` (all samples if None)."""
        value = flops.to(torch.float64) if isinstance(flops, torch.Tensor) else float(flops)
        if index is None:
            if isinstance(value, float):
                self._common += value
            else:
                self._flops += value
        elif isinstance(value, float):
            if index is not self._pending_index:
                self._flush()
                self._pending_index = index
            self._pending += value
        else:
            self._flops.index_add_(0, index, value)
        if self.track_parts and part:
            slot = self.by_part.setdefault(part, torch.zeros_like(self._flops))
            if index is None:
                slot += value
            else:
                v = value if isinstance(value, torch.Tensor) else torch.full(
                    (index.numel(),), value, dtype=torch.float64, device=slot.device)
                slot.index_add_(0, index, v)
