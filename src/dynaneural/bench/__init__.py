"""Benchmarks: realized against theoretical speed-up, measured as ratios in one run."""

from dynaneural.bench.early_exit import (
    EarlyExitRow,
    StaticRow,
    benchmark_early_exit,
    benchmark_static,
    overhead_with_exits_disabled,
    run_in_batches,
)
from dynaneural.bench.timing import Comparison, compare, tuned_allocator_env

__all__ = ["EarlyExitRow", "StaticRow", "benchmark_early_exit", "benchmark_static", "overhead_with_exits_disabled",
           "run_in_batches", "Comparison", "compare", "tuned_allocator_env"]
