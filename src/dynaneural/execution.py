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

__all__ = ["Mode", "tree_index_select", "tree_map"]


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


def tree_index_select(tree: T, index: torch.Tensor) -> T:
    """Keep the rows ``index`` (dim 0) of every tensor in a nested state: the compaction step."""
    return tree_map(lambda t: t.index_select(0, index), tree)
