"""Early-exit benchmark: accuracy, mean FLOPs, theoretical and *realized* speed-up per budget and batch size.

For each budget the exits are calibrated on the validation split, then the test split is run in execute mode.
The realized speed-up is the ratio of wall-clock times, measured interleaved in one run, of the network's
static twin (same weights, run to full depth, no exit classifiers) and the dynamic network in execute mode over
the same inputs at the same batch size. The theoretical speed-up is the ratio of FLOPs. A row with every exit
disabled measures the machinery's own overhead against the static twin.

At batch sizes above 1 the same inputs are also timed as a *stream* (``realized_speedup_stream``): the dynamic
network runs all of them with ``slots=batch_size`` (per-exit queues, every segment of stages on full batches;
``MultiExitNetwork._execute_stream``) against the static twin over the same inputs in batches of that size. That
is the throughput of a server fed a stream; ``realized_speedup`` is the latency of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dynaneural.bench.timing import compare
from dynaneural.calibration import (
    CalibrationResult,
    ExitBudgetController,
    calibrate_exits,
    collect_exit_statistics,
    measure_latency_profile,
)
from dynaneural.sample_wise.early_exit.multi_exit import ExitCostProfile, MultiExitNetwork

__all__ = ["EarlyExitRow", "StaticRow", "benchmark_early_exit", "benchmark_static", "controlled_stream", "run_in_batches"]


@dataclass
class EarlyExitRow:
    """One (budget, batch size) measurement."""

    budget: float
    unit: str
    batch_size: int
    accuracy: float
    mean_flops: float
    achieved_budget: float
    budget_error: float
    theoretical_speedup: float
    latency_model_speedup: float
    realized_speedup: float
    realized_over_theoretical: float
    static_ms_per_sample: float
    dynamic_ms_per_sample: float
    exit_fractions: list[float]
    thresholds: list[float]
    rule: str
    method: str
    timed_samples: int
    # The same budget held online on the test stream (ExitBudgetController, batches of 64, test-set order).
    controlled_accuracy: float | None = None
    controlled_achieved_budget: float | None = None
    controlled_budget_error: float | None = None
    # Streamed execution (batch sizes > 1): static twin in batches ÷ the dynamic network with slots=batch_size.
    realized_speedup_stream: float | None = None
    realized_over_theoretical_stream: float | None = None
    stream_ms_per_sample: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StaticRow:
    """A static network's accuracy, FLOPs and time (for the static-family comparison)."""

    name: str
    batch_size: int
    accuracy: float
    flops: float
    ms_per_sample: float
    reference_ms_per_sample: float
    relative_time: float  # this network's time / the reference (full-depth) network's, measured interleaved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def run_in_batches(fn: Any, x: torch.Tensor, batch_size: int) -> list[Any]:
    return [fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _time_subset(x: torch.Tensor, batch_size: int, timed_samples: int) -> torch.Tensor:
    n = min(x.shape[0], max(batch_size, timed_samples))
    return x[:n]


def _achieved(model: MultiExitNetwork, unit: str, cost: torch.Tensor, exits: torch.Tensor, static_flops: float,
              predicted_ms: float) -> float:
    """Mean cost in the budget's unit."""
    if unit == "fraction":
        return float(cost.mean()) / static_flops
    if unit == "flops":
        return float(cost.mean())
    if unit == "depth":
        stage_of = torch.tensor(model.exit_stage, dtype=torch.float64)[exits]
        return float(((stage_of + 1) / len(model.stages)).mean())
    return predicted_ms  # ms: the latency model's prediction for the samples' paths


@torch.inference_mode()
def controlled_stream(model: MultiExitNetwork, calibration: CalibrationResult, x: torch.Tensor, *,
                      batch_size: int = 64, window: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``x`` in order as a stream under an :class:`ExitBudgetController` started from ``calibration``;
    return (logits, cost, exits). The model's thresholds are restored afterwards."""
    device = next(model.parameters()).device
    saved = (model.exit_rule, model.exit_thresholds.clone())
    ctl = ExitBudgetController.from_calibration(model, calibration, window=window)
    try:
        outs = [ctl(x[i:i + batch_size].to(device), validate=False) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.configure_exits(rule=saved[0], thresholds=saved[1])
    return (torch.cat([o.logits for o in outs]).cpu(), torch.cat([o.cost for o in outs]).cpu(),
            torch.cat([o.exit_index for o in outs]).cpu())


def _predicted_ms(latency: ExitCostProfile, enabled: torch.Tensor, exits: torch.Tensor, with_policy: bool) -> float:
    return float(latency.path_costs(enabled, with_policy=with_policy)[exits].mean())


@torch.inference_mode()
def benchmark_early_exit(model: MultiExitNetwork, *, val_x: torch.Tensor, val_y: torch.Tensor,
                         test_x: torch.Tensor, test_y: torch.Tensor, budgets: Sequence[float],
                         batch_sizes: Sequence[int] = (1, 64), unit: str = "fraction", method: str = "geometric",
                         rule: str = "confidence", repeats: int = 9, timed_samples: int = 2048,
                         timed_samples_batch1: int = 256) -> list[EarlyExitRow]:
    """Calibrate to each budget and measure every batch size. Leaves the model calibrated to the last budget.

    ``unit="ms"`` calibrates to measured milliseconds per sample at each batch size (one latency profile per batch
    size); the other units are machine-independent and share one calibration across batch sizes.
    """
    model.eval()
    device = next(model.parameters()).device
    static = model.to_static().eval()
    static_flops = model.cost_profile().static_total
    stats = collect_exit_statistics(model, val_x, val_y, rule=rule)
    rows: list[EarlyExitRow] = []
    controlled: dict[tuple[float, int], tuple[float, float]] = {}
    for bs in batch_sizes:
        # Per-piece latency at this batch size: its prediction separates what FLOPs miss (early stages run at a
        # lower FLOP rate than late ones) from what compaction costs (smaller sub-batches, gathers, decisions).
        latency = measure_latency_profile(model, val_x[:512], batch_size=bs, repeats=7, warmup=2)
        n_timed = timed_samples_batch1 if bs == 1 else timed_samples
        xt = _time_subset(test_x, bs, n_timed).to(device)
        for budget in budgets:
            res = calibrate_exits(model, val_x, val_y, budget=budget, unit=unit, method=method,  # type: ignore[arg-type]
                                  stats=stats, latency=latency if unit == "ms" else None,
                                  latency_batch_size=bs if unit == "ms" else None)
            outs = run_in_batches(lambda b: model(b.to(device), mode="execute"), test_x, 512)
            logits = torch.cat([o.logits for o in outs]).cpu()
            cost = torch.cat([o.cost for o in outs]).cpu()
            exits = torch.cat([o.exit_index for o in outs]).cpu()
            acc = float((logits.argmax(-1) == test_y).float().mean())
            mean_flops = float(cost.mean())
            enabled = torch.tensor([t != float("inf") for t in res.thresholds])
            predicted_ms = _predicted_ms(latency, enabled, exits, stats.rule.needs_policy)
            achieved = _achieved(model, unit, cost, exits, static_flops, predicted_ms)
            key = (float(budget), bs if unit == "ms" else 0)  # ms budgets are calibrated per batch size
            if key not in controlled:  # label-free online control on the test stream (once per calibration)
                c_logits, c_cost, c_exits = controlled_stream(model, res, test_x)
                c_achieved = _achieved(model, unit, c_cost, c_exits, static_flops,
                                       _predicted_ms(latency, enabled, c_exits, stats.rule.needs_policy))
                controlled[key] = (float((c_logits.argmax(-1) == test_y).float().mean()), c_achieved)
            c_acc, c_achieved = controlled[key]
            cmp = compare(lambda xt=xt, bs=bs: run_in_batches(static, xt, bs),
                          lambda xt=xt, bs=bs: run_in_batches(lambda b: model(b, mode="execute", validate=False), xt, bs),
                          repeats=repeats)
            theo = static_flops / mean_flops
            stream: dict[str, float | None] = {}
            if bs > 1:
                scmp = compare(lambda xt=xt, bs=bs: run_in_batches(static, xt, bs),
                               lambda xt=xt, bs=bs: model(xt, mode="execute", validate=False, slots=bs),
                               repeats=repeats)
                stream = {"realized_speedup_stream": scmp.speedup,
                          "realized_over_theoretical_stream": scmp.speedup / theo,
                          "stream_ms_per_sample": scmp.candidate_s * 1e3 / xt.shape[0]}
            rows.append(EarlyExitRow(
                budget=float(budget), unit=unit, batch_size=bs, accuracy=acc, mean_flops=mean_flops,
                achieved_budget=achieved, budget_error=achieved / float(budget) - 1.0, theoretical_speedup=theo,
                latency_model_speedup=latency.static_total / predicted_ms,
                realized_speedup=cmp.speedup, realized_over_theoretical=cmp.speedup / theo,
                static_ms_per_sample=cmp.baseline_s * 1e3 / xt.shape[0],
                dynamic_ms_per_sample=cmp.candidate_s * 1e3 / xt.shape[0],
                exit_fractions=torch.bincount(exits, minlength=model.num_exits).double().div(len(exits)).tolist(),
                thresholds=res.thresholds, rule=rule, method=method, timed_samples=xt.shape[0],
                controlled_accuracy=c_acc, controlled_achieved_budget=c_achieved,
                controlled_budget_error=c_achieved / float(budget) - 1.0, **stream))
    return rows


@torch.inference_mode()
def overhead_with_exits_disabled(model: MultiExitNetwork, x: torch.Tensor, *, batch_size: int, repeats: int = 15,
                                 timed_samples: int = 2048) -> dict[str, float]:
    """Time of execute mode with every exit disabled ÷ time of the static twin (the machinery's overhead)."""
    model.eval()
    saved = (model.exit_rule, model.exit_thresholds.clone())
    model.disable_exits()
    try:
        xt = _time_subset(x, batch_size, timed_samples)
        static = model.to_static().eval()
        cmp = compare(lambda: run_in_batches(static, xt, batch_size),
                      lambda: run_in_batches(lambda b: model(b, mode="execute", validate=False), xt, batch_size),
                      repeats=repeats)
    finally:
        model.configure_exits(rule=saved[0], thresholds=saved[1])
    return {"batch_size": batch_size, "overhead_ratio": cmp.candidate_s / cmp.baseline_s,
            "static_ms_per_sample": cmp.baseline_s * 1e3 / xt.shape[0],
            "dynamic_ms_per_sample": cmp.candidate_s * 1e3 / xt.shape[0]}


@torch.inference_mode()
def benchmark_static(models: dict[str, torch.nn.Module], reference: torch.nn.Module, *, test_x: torch.Tensor,
                     test_y: torch.Tensor, flops: dict[str, float], batch_size: int, repeats: int = 9,
                     timed_samples: int = 2048) -> list[StaticRow]:
    """Accuracy and time of static networks, each timed interleaved against the same reference network."""
    rows = []
    xt = _time_subset(test_x, batch_size, timed_samples)
    for name, m in models.items():
        m.eval()
        logits = torch.cat(run_in_batches(m, test_x, 512))
        acc = float((logits.argmax(-1) == test_y).float().mean())
        cmp = compare(lambda: run_in_batches(reference, xt, batch_size), lambda m=m: run_in_batches(m, xt, batch_size),
                      repeats=repeats)
        rows.append(StaticRow(name=name, batch_size=batch_size, accuracy=acc, flops=flops[name],
                              ms_per_sample=cmp.candidate_s * 1e3 / xt.shape[0],
                              reference_ms_per_sample=cmp.baseline_s * 1e3 / xt.shape[0],
                              relative_time=cmp.candidate_s / cmp.baseline_s))
    return rows
