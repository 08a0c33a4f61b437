"""The per-sample cost ledger: what each sample actually paid for.

Every dynamic model charges the ledger for the pieces of computation it runs, *for the samples that ran them*.
In execute mode the charged indices are exactly the rows of the compacted sub-batch; in simulate mode the
model charges the same pieces from its hard decisions, so the two modes produce the same ledger (tested).
"""

from __future__ import annotations

import torch

__all__ = ["CostLedger"]


class CostLedger:
    """Accumulates per-sample FLOPs (float64, exact for integer counts up to 2**53).

    Scalar charges are kept as Python numbers until the ledger is read: one pending sum for every row, one for
    the current sub-batch (the same index tensor charged stage after stage). So a stage costs no tensor op for the
    ledger, and a batch in which every sample paid the same (always the case at batch 1) costs a single
    ``torch.full`` when read.

    Attributes:
        by_part: per-sample FLOPs charged under each part name (e.g. ``"stage2"``, ``"exit1"``), shape (B,), when
            the ledger was created with ``track_parts=True``.
    """

    __slots__ = ("batch_size", "device", "track_parts", "by_part", "_flops", "_common", "_pending_index",
                 "_pending")

    def __init__(self, batch_size: int, *, device: torch.device | str | None = None, track_parts: bool = False
                 ) -> None:
        self.batch_size = int(batch_size)
        self.device = device
        self.track_parts = track_parts
        self.by_part: dict[str, torch.Tensor] = {}
        self._flops: torch.Tensor | None = None  # created on the first per-row charge or read
        self._common = 0.0
        self._pending_index: torch.Tensor | None = None
        self._pending = 0.0

    @classmethod
    def zeros(cls, batch_size: int, *, device: torch.device | str | None = None, track_parts: bool = False
              ) -> CostLedger:
        return cls(batch_size, device=device, track_parts=track_parts)

    @property
    def flops(self) -> torch.Tensor:
        """(B,) float64 FLOPs charged to each sample so far."""
        self._flush()
        if self._flops is None:
            self._flops = torch.full((self.batch_size,), self._common, dtype=torch.float64, device=self.device)
        elif self._common:
            self._flops += self._common
        self._common = 0.0
        return self._flops

    def _rows(self) -> torch.Tensor:
        if self._flops is None:
            self._flops = torch.zeros(self.batch_size, dtype=torch.float64, device=self.device)
        return self._flops

    def _flush(self) -> None:
        if self._pending_index is not None and self._pending:
            idx = self._pending_index
            self._rows().index_add_(0, idx, torch.full((idx.numel(),), self._pending, dtype=torch.float64,
                                                       device=idx.device))
        self._pending_index, self._pending = None, 0.0

    def charge(self, flops: float | torch.Tensor, index: torch.Tensor | None = None, *, part: str = "") -> None:
        """Charge ``flops`` (a scalar or per-row tensor) to the samples in ``index`` (all samples if None)."""
        value = flops.to(torch.float64) if isinstance(flops, torch.Tensor) else float(flops)
        if index is None:
            if isinstance(value, float):
                self._common += value
            else:
                self._rows().add_(value)
        elif isinstance(value, float):
            if index is not self._pending_index:
                self._flush()
                self._pending_index = index
            self._pending += value
        else:
            self._rows().index_add_(0, index, value)
        if self.track_parts and part:
            slot = self.by_part.get(part)
            if slot is None:
                slot = self.by_part[part] = torch.zeros(self.batch_size, dtype=torch.float64, device=self.device)
            if index is None:
                slot += value
            else:
                v = value if isinstance(value, torch.Tensor) else torch.full(
                    (index.numel(),), value, dtype=torch.float64, device=slot.device)
                slot.index_add_(0, index, v)
