"""calibrate_knob: bisection of one threshold-like knob to a budget."""

import pytest
import torch

from dynaneural.calibration import calibrate_knob


def _setup():
    scores = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    state = {"knob": 0.5}

    def mean_cost(t):  # a block runs for samples whose score is above t: cost falls as t rises
        return float((scores >= t).double().mean() * 0.7 + 0.3)

    def set_knob(t):
        state["knob"] = t

    return mean_cost, set_knob, state


@pytest.mark.parametrize("budget", [0.4, 0.65, 0.95])
def test_meets_the_budget(budget):
    mean_cost, set_knob, state = _setup()
    res = calibrate_knob(mean_cost=mean_cost, set_knob=set_knob, budget=budget, lo=0.0, hi=1.0)
    assert abs(res.relative_error) < 2e-3
    assert state["knob"] == res.knob and mean_cost(res.knob) == res.mean_cost


def test_out_of_range_budget_raises_and_restores():
    mean_cost, set_knob, state = _setup()
    with pytest.raises(ValueError, match="out of range"):
        calibrate_knob(mean_cost=mean_cost, set_knob=set_knob, budget=0.1, lo=0.0, hi=1.0, current=0.5)
    assert state["knob"] == 0.5
