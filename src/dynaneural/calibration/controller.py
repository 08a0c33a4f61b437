"""Holding a compute budget on a stream whose difficulty drifts: online control of exit thresholds.

Thresholds calibrated offline (:func:`~dynaneural.calibration.calibrate_exits`) meet the budget on data distributed
like the validation split. When the deployed stream is easier or harder (MNIST's official test set is easier than
its training set: more samples are confident early), the same thresholds make more or fewer samples leave early
and the mean cost drifts off the budget: 3–7 % below it on MNIST.

The cost of a sample depends only on the exit it leaves at, so the mean cost is fixed by the *fractions* of
samples leaving at each exit. Calibration chose those fractions ``f_0 … f_{K-1}`` on validation data; the
controller keeps them on the stream. Of the samples that *reach* exit k, the share ``r_k = f_k / (1 - f_0 - … -
f_{k-1})`` must leave there, and every sample that reaches exit k is scored there anyway. So after each batch the
controller sets ``t_k`` to the score above which a share ``r_k`` of the last ``window`` scores seen at exit k lie
(MSDNet's assignment rule, applied to a sliding window). No labels are used and nothing extra is computed: the
scores come from :attr:`~dynaneural.outputs.EarlyExitOutput.reached_scores` of the forward that already ran.

Holding the fractions is not quite enough: the deep exits cost many times the early ones, so a small error in
a rare deep exit's fraction is a large error in the mean cost (on MNIST 2 % of the samples reach the last exit and
pay 12× the first exit's path). An outer integral loop therefore watches the cost itself: the relative shortfall of
each batch's mean cost is accumulated (``gain`` per ``window`` samples), the fractions' cost set-point is moved by
it, and the target fractions are re-tilted toward deeper (or earlier) exits, ``f_k ∝ f_k^cal · exp(λ k)``, with λ
solved so that their cost meets the set-point. A persistent shortfall keeps pushing until the cumulative mean
cost is back on the budget.

With a stationary stream the thresholds converge to the stream's quantiles, the fractions to the calibrated ones
and the mean cost to the budget. Accuracy then follows the stream (on an easier stream the budget buys deeper
exits for the harder samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynaneural.calibration.exits import CalibrationResult
from dynaneural.outputs import EarlyExitOutput
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

__all__ = ["ExitBudgetController", "ControllerState"]


@dataclass(frozen=True)
class ControllerState:
    """What the controller has seen so far.

    Attributes:
        samples: samples run through it.
        mean_cost: their mean FLOPs per sample (the cost ledger's).
        exit_fractions: the fraction of them that left at each exit.
        thresholds: the thresholds now in force.
    """

    samples: int
    mean_cost: float
    exit_fractions: list[float]
    thresholds: list[float]


class _ScoreWindow:
    """The last ``size`` scores seen at one exit (a ring buffer)."""

    def __init__(self, size: int) -> None:
        self.buf = torch.empty(size, dtype=torch.float32)
        self.count = 0  # scores written so far (the ring holds min(count, size) of them)

    def push(self, scores: torch.Tensor) -> None:
        s = scores.detach().float().flatten().cpu()
        s = s[~torch.isnan(s)]
        size = self.buf.numel()
        if s.numel() >= size:
            self.buf.copy_(s[-size:])
            self.count += s.numel()
            return
        pos = self.count % size
        head = min(size - pos, s.numel())
        self.buf[pos:pos + head] = s[:head]
        self.buf[:s.numel() - head] = s[head:]
        self.count += s.numel()

    def values(self) -> torch.Tensor:
        return self.buf[:min(self.count, self.buf.numel())]


class ExitBudgetController:
    """Keep a multi-exit network at its calibrated exit fractions (hence its budget) on a drifting stream.

    Args:
        model: a calibrated multi-exit network; the controller writes its thresholds (``configure_exits``).
        exit_fractions: (K,) target fraction of samples leaving at each exit (sums to 1), usually
            :attr:`CalibrationResult.exit_fractions` — see :meth:`from_calibration`.
        window: scores kept per exit; the thresholds follow the last ``window`` samples that reached each exit.
        min_samples: an exit's threshold is left as calibrated until this many scores were seen there.
        gain: integral gain of the cost loop (relative cost error accumulated per ``window`` samples); 0 holds
            the fractions only.

    Raises:
        ValueError: fractions of the wrong length, negative or not summing to 1; a window or minimum below 1.
    """

    def __init__(self, model: MultiExitNetwork, *, exit_fractions: Sequence[float], window: int = 512,
                 min_samples: int = 128, gain: float = 4.0) -> None:
        f = [float(v) for v in exit_fractions]
        if len(f) != model.num_exits:
            raise ValueError(f"expected {model.num_exits} exit fractions, got {len(f)}")
        if any(not math.isfinite(v) or v < 0 for v in f) or abs(sum(f) - 1.0) > 1e-6:
            raise ValueError(f"exit fractions must be non-negative and sum to 1, got {f}")
        if window < 1 or min_samples < 1:
            raise ValueError(f"window and min_samples must be >= 1, got {window} and {min_samples}")
        if min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) cannot exceed the window ({window})")
        if not math.isfinite(gain) or gain < 0:
            raise ValueError(f"gain must be a non-negative number, got {gain}")
        self.model = model
        self.exit_fractions = f
        self.min_samples = int(min_samples)
        self.window, self.gain = int(window), float(gain)
        enabled = model.exit_thresholds.detach().cpu() != float("inf")
        enabled[-1] = True
        path = model.cost_profile().path_costs(enabled, with_policy=model.exit_rule.needs_policy)
        self._path = [float(c) if e else 0.0 for c, e in zip(path.tolist(), enabled.tolist(), strict=True)]
        self.target_cost = sum(fk * ck for fk, ck in zip(f, self._path, strict=True))  # FLOPs per sample
        self._integral = 0.0  # accumulated relative cost shortfall
        self.rates = self._rates(f)  # share of the samples reaching exit k that must leave there
        self._windows = [_ScoreWindow(int(window)) for _ in f]
        self._samples = 0
        self._cost = 0.0
        self._exits = torch.zeros(model.num_exits, dtype=torch.float64)

    @staticmethod
    def _rates(f: Sequence[float]) -> list[float]:
        rates, remaining = [], 1.0
        for v in f:
            rates.append(min(1.0, v / remaining) if remaining > 1e-12 else 1.0)
            remaining -= v
        return rates

    def _tilted(self, lam: float) -> list[float]:
        w = [fk * math.exp(lam * k) for k, fk in enumerate(self.exit_fractions)]
        total = sum(w)
        return [v / total for v in w]

    def _fractions_for_cost(self, cost: float) -> list[float]:
        """The calibrated fractions tilted (f_k ∝ f_k · exp(λ k)) so that their mean path cost is ``cost``."""
        def mean_cost(lam: float) -> float:
            return sum(fk * ck for fk, ck in zip(self._tilted(lam), self._path, strict=True))
        lo, hi = -30.0, 30.0  # the cost rises with λ (mass moves to later, dearer exits)
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_cost(mid) < cost else (lo, mid)
        return self._tilted((lo + hi) / 2)

    @classmethod
    def from_calibration(cls, model: MultiExitNetwork, result: CalibrationResult, **kwargs: Any
                         ) -> ExitBudgetController:
        """A controller holding the exit fractions ``result`` achieved on its calibration split."""
        return cls(model, exit_fractions=result.exit_fractions, **kwargs)

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> EarlyExitOutput:
        """Run ``x`` in execute mode with the current thresholds, then update them from what was observed."""
        out = self.model(x, mode="execute", **kwargs)
        self.observe(out)
        return out

    def observe(self, out: EarlyExitOutput) -> None:
        """Account for one forward's costs and exits, and re-set the thresholds from its scores."""
        if out.reached_scores is None:
            raise ValueError("this output carries no reached_scores (train mode?): run the model in execute or "
                             "simulate mode")
        n = out.cost.numel()
        batch_cost = float(out.cost.sum())
        self._samples += n
        self._cost += batch_cost
        if self.gain > 0 and self.target_cost > 0:  # the outer loop: move the fractions' cost set-point
            shortfall = 1.0 - batch_cost / n / self.target_cost
            # clipped: a set-point the exits cannot reach must not wind the loop up without bound
            self._integral = min(1.0, max(-1.0, self._integral + self.gain * shortfall * n / self.window))
            self.rates = self._rates(self._fractions_for_cost(self.target_cost * (1.0 + self._integral)))
        self._exits += torch.bincount(out.exit_index.cpu(), minlength=self.model.num_exits).double()
        for k, s in enumerate(out.reached_scores):
            if s is not None:
                self._windows[k].push(s)
        self._retune()

    def _retune(self) -> None:
        thr = self.model.exit_thresholds.detach().float().cpu().clone()
        changed = False
        for k in range(self.model.num_exits - 1):
            rate = self.rates[k]
            if not math.isfinite(float(thr[k])) or not 0.0 < rate < 1.0:
                continue  # disabled, or a degenerate target (nobody / everybody leaves): keep the calibrated one
            seen = self._windows[k].values()
            n = seen.numel()
            if n < self.min_samples:
                continue
            ordered = seen.sort(descending=True).values
            m = round(rate * n)  # this many of the window's samples should have left
            if m <= 0:
                t = float(ordered[0]) + 1e-6
            elif m >= n:
                t = float(ordered[-1])
            else:  # half-way between the last to leave and the first to stay (as offline calibration does)
                t = 0.5 * (float(ordered[m - 1]) + float(ordered[m]))
            if t != float(thr[k]):
                thr[k], changed = t, True
        if changed:
            self.model.configure_exits(rule=self.model.exit_rule, thresholds=thr)

    @property
    def state(self) -> ControllerState:
        n = max(self._samples, 1)
        return ControllerState(samples=self._samples, mean_cost=self._cost / n,
                               exit_fractions=(self._exits / n).tolist(),
                               thresholds=self.model.exit_thresholds.tolist())
