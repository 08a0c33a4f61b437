"""Fit one scalar knob of any dynamic model (a gate threshold, a halting epsilon, a keep ratio) to a budget.

The early-exit calibration (:mod:`dynaneural.calibration.exits`) solves a richer problem (one threshold per
exit). Most other decisions expose a single knob whose mean cost on validation data is monotone in it: raise a
gate's threshold and fewer blocks run. :func:`calibrate_knob` bisects that knob until the validation mean cost
meets the target, checks the target is reachable first (an out-of-range budget raises and leaves the model as
it was), and returns what it measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dynaneural.validation import check_budget

__all__ = ["KnobCalibration", "calibrate_knob"]


@dataclass(frozen=True)
class KnobCalibration:
    """Result of :func:`calibrate_knob`: the knob's value, the mean cost it gives and the target."""

    knob: float
    mean_cost: float
    target: float
    evaluations: int

    @property
    def relative_error(self) -> float:
        return self.mean_cost / self.target - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative_error": self.relative_error}


def calibrate_knob(*, mean_cost: Callable[[float], float], set_knob: Callable[[float], None], budget: float,
                   lo: float, hi: float, unit: str = "fraction", tol: float = 1e-3, iters: int = 40,
                   current: float | None = None) -> KnobCalibration:
    """Bisect a knob in [lo, hi] so that ``mean_cost(knob)`` meets ``budget``.

    Args:
        mean_cost: the validation mean cost per sample (in ``unit``) with the knob at a value; it must be
            monotone in the knob (either direction). It must not leave the model changed (``set_knob`` does).
        set_knob: installs the chosen value in the model.
        budget: target mean cost per sample, in ``unit``.
        lo, hi: the knob's range.
        tol: stop when the relative cost error is below ``tol``.
        current: the knob's present value, restored if the budget is out of range (else left unset).

    Raises:
        ValueError: the budget lies outside what the knob can reach on this data.
    """
    c_lo, c_hi = mean_cost(lo), mean_cost(hi)
    low, high = min(c_lo, c_hi), max(c_lo, c_hi)
    try:
        check_budget(budget, low=low, high=high, unit=unit)
    except ValueError:
        if current is not None:
            set_knob(current)
        raise
    increasing = c_hi >= c_lo
    a, b, n = lo, hi, 2
    best = (lo, c_lo) if abs(c_lo - budget) <= abs(c_hi - budget) else (hi, c_hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        c = mean_cost(mid)
        n += 1
        if abs(c - budget) < abs(best[1] - budget) or (abs(c - budget) == abs(best[1] - budget) and c <= budget):
            best = (mid, c)
        if abs(c / budget - 1.0) <= tol:
            break
        if (c < budget) == increasing:
            a = mid
        else:
            b = mid
    set_knob(best[0])
    return KnobCalibration(knob=best[0], mean_cost=best[1], target=float(budget), evaluations=n)
