"""Execution modes and the batch-compaction helpers every dynamic model shares.

A DynaNeural model runs in one of three modes:

* ``TRAIN`` — everything that any sample could need is computed, discrete decisions are relaxed
  (straight-through, Gumbel-softmax) or sampled so that the model can be trained end to end;
* ``SIMULATE`` — the reference semantics: hard decisions, applied after computing everything (masks,
  gathers). Slow on purpose and easy to trust;
* ``EXECUTE`` — the same hard decisions, but skipped work is never computed: the samples that still need a
  piece of computation are gathered into a compact sub-batch, run, and their results scattered back into the
  original order. It is tested to match ``SIMULATE`` in outputs and in per-sample cost.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

import torch

__all__ = ["Mode", "check_slots", "group_rows", "rows_where", "run_rows", "scatter_exits", "retire_rows",
           "select_rows", "tree_cat", "tree_index_select", "tree_map", "tree_slice"]


class Mode(str, Enum):
    """How a dynamic model runs; see the module docstring."""

    TRAIN = "train"
    SIMULATE = "simulate"
    EXECUTE = "execute"

    @classmethod
    def parse(cls, value: Mode | str) -> Mode:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown mode {value!r}; expected one of {[m.value for m in cls]}") from None


T = TypeVar("T")


def tree_map(fn: Any, tree: T) -> T:
    """Apply ``fn`` to every tensor in a nested list/tuple/dict of tensors."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, list):
        return [tree_map(fn, t) for t in tree]  # type: ignore[return-value]
    if isinstance(tree, tuple):
        return tuple(tree_map(fn, t) for t in tree)  # type: ignore[return-value]
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}  # type: ignore[return-value]
    return tree


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` that keeps a channels-last feature map channels-last.

    ``index_select`` returns a standard-contiguous tensor; for an (N, C, H, W) map stored channels-last (the faster
    convolution layout on CPU) the compacted sub-batch would then run its convolutions in the other layout and be
    converted back when scattered. Gathering the NHWC view instead keeps the layout, at the same copy cost.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def tree_index_select(tree: T, index: torch.Tensor) -> T:
    """Keep the rows ``index`` (dim 0) of every tensor in a nested state: the compaction step (memory layout
    kept, :func:`select_rows`)."""
    return tree_map(lambda t: select_rows(t, index), tree)


def tree_slice(tree: T, start: int | None = None, stop: int | None = None) -> T:
    """Rows ``start:stop`` (dim 0, views) of every tensor in a nested state."""
    return tree_map(lambda t: t[start:stop], tree)


def tree_cat(first: T, second: T) -> T:
    """Concatenate (dim 0) two nested states of the same structure: new rows joining a batch in flight."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])  # type: ignore[return-value]
    if isinstance(first, (list, tuple)):
        return type(first)(tree_cat(a, b) for a, b in zip(first, second, strict=True))  # type: ignore[return-value]
    if isinstance(first, dict):
        if first.keys() != second.keys():  # type: ignore[attr-defined]
            raise ValueError(f"states differ in keys: {sorted(first)} vs {sorted(second)}")  # type: ignore[arg-type]
        return {k: tree_cat(v, second[k]) for k, v in first.items()}  # type: ignore[return-value, index]
    return first


def retire_rows(out: torch.Tensor, exit_step: torch.Tensor, slot_item: torch.Tensor, slot_step: torch.Tensor,
                fin: torch.Tensor, logits: torch.Tensor) -> None:
    """Streamed execution: the in-flight rows ``fin`` are done. Write their ``logits`` and the step they stopped at
    into the outputs of the items they hold (``slot_item``: which input each row holds; ``slot_step``: its step)."""
    dest = slot_item.index_select(0, fin)
    out.index_copy_(0, dest, logits)
    exit_step.index_copy_(0, dest, slot_step.index_select(0, fin))


def check_slots(slots: object) -> int:
    """Validate the ``slots`` of a streamed execution (continuous batching): a positive int."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive int, got {slots!r}")
    return slots


def rows_where(active: torch.Tensor) -> torch.Tensor:
    """(n,) int64 indices of the True rows of a (B,) bool mask — the sub-batch to gather."""
    if active.dtype != torch.bool or active.dim() != 1:
        raise ValueError(f"active must be a (B,) bool mask, got {tuple(active.shape)} {active.dtype}")
    return active.nonzero().squeeze(1)


def run_rows(fn: Any, x: torch.Tensor, index: torch.Tensor, *, into: torch.Tensor | None = None,
             inplace: bool = False) -> torch.Tensor:
    """Run ``fn`` on the rows ``index`` of ``x`` only, and scatter the results into ``into`` (default: a copy of x).

    This is the compaction step of execute mode: the rows not in ``index`` are never computed and keep their
    value in ``into`` (the identity, for a skipped residual block). ``fn`` must map (n, ...) to (n, ...) of the
    same trailing shape as ``into``. With every row selected it runs ``fn`` on ``x`` directly (no copy).

    ``inplace=True`` writes the rows into ``into`` (or ``x``) itself instead of a copy: no pass over the rows that
    did not run, which for a residual state at batch 64 is a copy as large as the block's input. Only for a state
    the caller owns and autograd does not need (it is refused when ``base`` requires grad under grad mode).
    """
    n = index.numel()
    if n == x.shape[0] and into is None:
        return fn(x)
    base = x if into is None else into
    if n == 0:
        return base
    y = fn(select_rows(x, index))
    if inplace:
        if torch.is_grad_enabled() and base.requires_grad:
            raise ValueError("run_rows(inplace=True) would overwrite a tensor autograd may need; use inplace=False")
        return base.index_copy_(0, index, y.to(base.dtype))
    # index_copy (out of place) would return a standard-contiguous copy of a channels-last state: keep its layout.
    return base.clone(memory_format=torch.preserve_format).index_copy_(0, index, y.to(base.dtype))


def group_rows(keys: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """Indices of the rows of each key 0..num_groups-1 (stable order): run each group as one sub-batch.

    One sort and one ``bincount`` instead of a mask per group, so it stays cheap with many groups (experts,
    width levels, halting steps).
    """
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_groups).tolist()
    if len(counts) > num_groups:
        raise ValueError(f"keys must lie in [0, {num_groups}), got max {int(keys.max())}")
    return list(torch.split(order, counts))


def scatter_exits(out: torch.Tensor, exit_index: torch.Tensor, active: torch.Tensor | None,
                  rows: torch.Tensor | None, logits: torch.Tensor, k: int) -> None:
    """Early-exit bookkeeping of a compacted batch: write the ``logits`` of ``rows`` (indices into the active
    sub-batch; None = all of it) to their input positions in ``out`` and record exit ``k`` in ``exit_index``.
    ``active`` maps sub-batch rows to input positions (None = the whole batch, in order: no gather needed)."""
    if rows is None:
        if active is None:
            out.copy_(logits)
            exit_index.fill_(k)
        else:
            out.index_copy_(0, active, logits)
            exit_index.index_fill_(0, active, k)
        return
    dest = rows if active is None else active.index_select(0, rows)
    out.index_copy_(0, dest, logits.index_select(0, rows))
    exit_index.index_fill_(0, dest, k)
