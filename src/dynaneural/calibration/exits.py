"""Calibrating exit thresholds to a compute budget.

Given a validation split and a target *mean* cost per sample, choose the per-exit thresholds of a multi-exit
network so that the mean cost on validation data equals the target, in one of four units:

* ``flops`` — FLOPs per sample (the cost ledger's unit);
* ``fraction`` — FLOPs as a fraction of the static twin (full depth, final classifier only);
* ``depth`` — fraction of the stages run;
* ``ms`` — milliseconds per sample at a given batch size *on this machine*: every stage and classifier is
  timed once at that batch size (:func:`measure_latency_profile`) and a sample's latency is the sum over the
  pieces it ran.

Two procedures:

* ``geometric`` — MSDNet's (Huang et al., ICLR 2018, Sec. 4 "budgeted batch classification"): the fraction of
  samples leaving at exit k follows a geometric prior ``p_k ∝ q^k``; thresholds are set on validation data so that
  those fractions leave at each exit, and ``q`` is found by bisection so that the mean cost meets the budget.
* ``search`` — a direct search: thresholds ``t_k = t + tilt * (k / (K - 2) - 1/2)`` over a grid of tilts, ``t``
  solved by bisection for each tilt so that the budget is met, and the tilt with the highest validation
  accuracy kept.

Scores come from one simulate-mode pass (:func:`collect_exit_statistics`): the rule's scores never depend on the
thresholds, so thresholds can be chosen offline.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from dynaneural.execution import Mode
from dynaneural.policies.exit_rules import ExitRule, create_exit_rule
from dynaneural.sample_wise.early_exit.multi_exit import ExitCostProfile, MultiExitNetwork
from dynaneural.validation import check_batch, check_budget

__all__ = [
    "ExitStatistics", "CalibrationResult", "collect_exit_statistics", "calibrate_exits", "cost_model",
    "measure_latency_profile", "assign_exits",
]

Unit = Literal["flops", "fraction", "depth", "ms"]
UNITS: tuple[str, ...] = ("flops", "fraction", "depth", "ms")
_NEVER = 1e30  # a finite "never exit" threshold: the exit stays enabled (stateful rules need its score)


@dataclass
class ExitStatistics:
    """Per-sample, per-exit facts from one simulate pass with every exit enabled.

    Attributes:
        scores: (N, K) exit-rule scores (NaN where the rule gives none, e.g. the learned rule's last exit).
        correct: (N, K) whether exit k's argmax is the label.
        profile: the network's FLOPs profile.
        rule: the exit rule the scores belong to.
    """

    scores: torch.Tensor
    correct: torch.Tensor
    profile: ExitCostProfile
    rule: ExitRule

    @property
    def num_exits(self) -> int:
        return self.scores.shape[1]


@dataclass
class CalibrationResult:
    """Chosen thresholds and what they achieve on the calibration split."""

    thresholds: list[float]
    rule: dict[str, Any]
    method: str
    unit: str
    target: float
    achieved: float
    accuracy: float
    exit_fractions: list[float]
    batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def collect_exit_statistics(model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, *,
                            rule: str | ExitRule = "confidence", batch_size: int = 512) -> ExitStatistics:
    """Score every exit for every sample of a validation split (simulate mode, all exits enabled)."""
    check_batch(x, input_shape=model.input_shape, name="validation input")
    if y.shape != (x.shape[0],) or y.dtype != torch.long:
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
    rule_obj = create_exit_rule(rule)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    never = [_NEVER] * model.num_exits
    scores, correct = [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            out = model(xb, mode=Mode.SIMULATE, rule=rule_obj, thresholds=never, validate=False)
            assert out.exit_scores is not None and out.exit_logits is not None
            scores.append(out.exit_scores.cpu())
            correct.append(torch.stack([lg.argmax(-1) == yb for lg in out.exit_logits], 1).cpu())
    finally:
        model.train(was_training)
    return ExitStatistics(torch.cat(scores), torch.cat(correct), model.cost_profile(), rule_obj)


def assign_exits(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N,) first exit whose score reaches its threshold (the last exit always fires)."""
    hits = scores >= thresholds.to(scores.dtype)  # NaN compares False
    hits[:, -1] = True
    return hits.to(torch.uint8).argmax(1)  # first True


def cost_model(profile: ExitCostProfile, *, unit: Unit, latency: ExitCostProfile | None = None) -> ExitCostProfile:
    """The profile of per-piece costs in ``unit`` (FLOPs, fraction of the static twin, depth or ms)."""
    if unit == "flops":
        return profile
    if unit == "fraction":
        total = profile.static_total
        return ExitCostProfile(tuple(s / total for s in profile.stage), tuple(h / total for h in profile.head),
                               tuple(p / total for p in profile.policy), profile.exit_stage)
    if unit == "depth":
        n = len(profile.stage)
        return ExitCostProfile((1.0 / n,) * n, (0.0,) * len(profile.head), (0.0,) * len(profile.head),
                               profile.exit_stage)
    if unit == "ms":
        if latency is None:
            raise ValueError("unit 'ms' needs a latency profile (measure_latency_profile)")
        return latency
    raise ValueError(f"unknown budget unit {unit!r}; expected one of {UNITS}")


def _mean_cost(stats: ExitStatistics, costs: ExitCostProfile, thresholds: torch.Tensor) -> tuple[float, torch.Tensor]:
    enabled = thresholds != math.inf
    enabled[-1] = True
    exits = assign_exits(stats.scores, thresholds)
    path = costs.path_costs(enabled, with_policy=stats.rule.needs_policy)
    return float(path[exits].mean()), exits


def _disable(rule: ExitRule) -> float:
    # Stateless rules can drop an exit entirely (its classifier is then never run); a stateful rule's later
    # scores depend on every earlier exit, so its exits stay enabled with an unreachable threshold.
    return _NEVER if rule.name == "patience" else math.inf


def _thresholds_for_fractions(stats: ExitStatistics, fractions: Sequence[float]) -> torch.Tensor:
    """MSDNet's assignment: at each exit in turn, the most confident remaining samples leave, as many as the
    prior asks; thresholds sit half-way between the last sample that leaves and the first that stays."""
    n, k = stats.scores.shape
    remaining = torch.ones(n, dtype=torch.bool)
    thr = torch.full((k,), _disable(stats.rule), dtype=torch.float32)
    thr[-1] = -math.inf
    for e in range(k - 1):
        want = int(round(fractions[e] * n))
        s = stats.scores[remaining, e]
        s = s[~torch.isnan(s)]
        if want <= 0 or s.numel() == 0:
            continue
        srt = s.sort(descending=True).values
        if want >= srt.numel():
            t = float(srt[-1]) - 1e-6
        else:
            hi, lo = float(srt[want - 1]), float(srt[want])
            t = (hi + lo) / 2 if hi > lo else math.nextafter(hi, math.inf)
        thr[e] = t
        remaining &= ~(stats.scores[:, e] >= t)
    return thr


def _bisect(fn: Any, lo: float, hi: float, target: float, *, increasing: bool, iters: int = 60) -> float:
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (fn(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _geometric(stats: ExitStatistics, costs: ExitCostProfile, target: float) -> tuple[torch.Tensor, dict[str, Any]]:
    k = stats.num_exits

    def thresholds(log_q: float) -> torch.Tensor:
        w = torch.tensor([math.exp(log_q * i) for i in range(k)], dtype=torch.float64)
        return _thresholds_for_fractions(stats, (w / w.sum()).tolist())

    # Larger q pushes samples to later exits: the mean cost increases with log q.
    log_q = _bisect(lambda lq: _mean_cost(stats, costs, thresholds(lq))[0], -20.0, 20.0, target, increasing=True)
    return thresholds(log_q), {"q": math.exp(log_q)}


def _search(stats: ExitStatistics, costs: ExitCostProfile, target: float, *, tilts: int = 21
            ) -> tuple[torch.Tensor, dict[str, Any]]:
    k = stats.num_exits
    finite = stats.scores[:, :-1][~torch.isnan(stats.scores[:, :-1])]
    lo, hi = float(finite.min()) - 1.0, float(finite.max()) + 1.0
    span = hi - lo
    pos = torch.linspace(-0.5, 0.5, k - 1) if k > 2 else torch.zeros(max(k - 1, 0))
    best: tuple[float, torch.Tensor, float] | None = None
    for tilt in torch.linspace(-span / 2, span / 2, tilts).tolist():
        def thresholds(t: float, tilt: float = tilt) -> torch.Tensor:
            thr = torch.empty(k, dtype=torch.float32)
            thr[:-1] = t + tilt * pos
            thr[-1] = -math.inf
            return thr

        # A higher common threshold keeps samples longer: the mean cost increases with t.
        t = _bisect(lambda t: _mean_cost(stats, costs, thresholds(t))[0], lo - span, hi + span, target,
                    increasing=True)
        thr = thresholds(t)
        cost, exits = _mean_cost(stats, costs, thr)
        acc = float(stats.correct[torch.arange(len(exits)), exits].float().mean())
        score = acc - 10.0 * abs(cost - target) / max(target, 1e-12)  # meet the budget first, then accuracy
        if best is None or score > best[0]:
            best = (score, thr, tilt)
    assert best is not None
    return best[1], {"tilt": best[2]}


def calibrate_exits(model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, *, budget: float,
                    unit: Unit = "fraction", method: Literal["geometric", "search"] = "geometric",
                    rule: str | ExitRule = "confidence", batch_size: int = 512,
                    latency: ExitCostProfile | None = None, latency_batch_size: int | None = None,
                    stats: ExitStatistics | None = None, apply: bool = True) -> CalibrationResult:
    """Choose exit thresholds meeting a mean-cost budget on (x, y) and, if ``apply``, store them in the model.

    Args:
        model: a multi-exit network (trained).
        x, y: the calibration (validation) split.
        budget: target mean cost per sample, in ``unit``.
        unit: ``flops``, ``fraction``, ``depth`` or ``ms``.
        method: ``geometric`` (MSDNet) or ``search``.
        rule: exit rule whose scores are thresholded.
        batch_size: batch size of the scoring pass.
        latency: per-piece latency profile for ``unit="ms"`` (from :func:`measure_latency_profile`).
        latency_batch_size: the batch size the latency was measured at (recorded in the result).
        stats: reuse scores from an earlier :func:`collect_exit_statistics` call (same rule).

    Raises:
        ValueError: unknown unit/method, or a budget outside what the model can spend.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown budget unit {unit!r}; expected one of {UNITS}")
    if method not in ("geometric", "search"):
        raise ValueError(f"unknown calibration method {method!r}; expected 'geometric' or 'search'")
    if stats is None:
        stats = collect_exit_statistics(model, x, y, rule=rule, batch_size=batch_size)
    costs = cost_model(stats.profile, unit=unit, latency=latency)
    k = stats.num_exits
    first_only = torch.full((k,), _disable(stats.rule), dtype=torch.float32)
    first_only[0], first_only[-1] = -math.inf, -math.inf
    none = torch.full((k,), _disable(stats.rule), dtype=torch.float32)
    none[-1] = -math.inf
    low = _mean_cost(stats, costs, first_only)[0]
    high = _mean_cost(stats, costs, none)[0]
    check_budget(budget, low=low, high=high, unit=unit)
    if k == 1:
        thr, extra = none, {}
    elif method == "geometric":
        thr, extra = _geometric(stats, costs, budget)
    else:
        thr, extra = _search(stats, costs, budget)
    achieved, exits = _mean_cost(stats, costs, thr)
    acc = float(stats.correct[torch.arange(len(exits)), exits].float().mean())
    fractions = torch.bincount(exits, minlength=k).double().div(len(exits)).tolist()
    if apply:
        model.configure_exits(rule=stats.rule, thresholds=thr)
    return CalibrationResult(thresholds=thr.tolist(), rule=stats.rule.config(), method=method, unit=unit,
                             target=float(budget), achieved=achieved, accuracy=acc, exit_fractions=fractions,
                             batch_size=latency_batch_size, extra=extra)


@torch.inference_mode()
def measure_latency_profile(model: MultiExitNetwork, x: torch.Tensor, *, batch_size: int, repeats: int = 20,
                            warmup: int = 5) -> ExitCostProfile:
    """Milliseconds per sample of each stage, classifier and policy head at ``batch_size`` on this machine.

    Each piece is timed on its real input (a batch of ``x``), median of ``repeats`` runs after ``warmup``.
    """
    check_batch(x, input_shape=model.input_shape)
    device = next(model.parameters()).device
    reps = max(1, -(-batch_size // x.shape[0]))
    xb = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].to(device)

    def timed(fn: Any, arg: Any) -> float:
        for _ in range(warmup):
            fn(arg)
        ts = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(arg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3 / batch_size

    return model.measure_pieces(xb, timed)
