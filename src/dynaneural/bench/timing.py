"""Honest wall-clock comparison of two ways of running the same inputs.

These machines are shared and noisy, so a speed-up is only ever reported as a *ratio measured in one run*: the
two sides are interleaved (A, B, A, B, …) after a warm-up, each side's time is the median of its repeats, and
the ratio of medians is reported. Absolute times are recorded for context, never asserted.

The glibc allocator page-faults heavily in these VMs and can double a timing (shared/FEASIBILITY.md);
:func:`tuned_allocator_env` gives the settings the benchmark commands re-execute themselves with, so both sides
of every comparison run under the same allocator.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Comparison", "compare", "tuned_allocator_env", "ALLOCATOR_ENV"]

ALLOCATOR_ENV = {"MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_TOP_PAD_": "1073741824"}


def tuned_allocator_env() -> dict[str, str] | None:
    """The environment to re-execute with if the allocator settings are not in force yet (else None)."""
    if all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return None
    return {**os.environ, **ALLOCATOR_ENV}


@dataclass(frozen=True)
class Comparison:
    """Medians (seconds per call) of two interleaved sides and their ratio ``baseline / candidate``."""

    baseline_s: float
    candidate_s: float
    repeats: int

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.candidate_s


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(baseline: Callable[[], object], candidate: Callable[[], object], *, repeats: int = 15, warmup: int = 3,
            min_time_s: float = 0.0) -> Comparison:
    """Time ``baseline()`` and ``candidate()`` interleaved; each call should do the whole workload once.

    ``min_time_s`` adds repeats until each side has run at least that long in total (stabilises short calls).
    """
    for _ in range(warmup):
        baseline()
        candidate()
    a: list[float] = []
    b: list[float] = []
    i = 0
    while i < repeats or (sum(a) < min_time_s and i < 50 * repeats):
        for fn, sink in ((baseline, a), (candidate, b)) if i % 2 == 0 else ((candidate, b), (baseline, a)):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            sink.append(time.perf_counter() - t0)
        i += 1
    return Comparison(statistics.median(a), statistics.median(b), len(a))
