"""Budget calibration: every unit, both procedures, held-out budget, thresholds saved with the model."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.calibration import (
    assign_exits,
    calibrate_exits,
    collect_exit_statistics,
    cost_model,
    measure_latency_profile,
)
from dynaneural.engine import load_model, save_model


@pytest.fixture
def model():
    return dn.create_model("test_exit_convnet").eval()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("method", ["geometric", "search"])
def test_budget_holds_on_held_out_data(model, method):
    xv, yv = _data(3000, 1)
    xt, _ = _data(3000, 2)
    calibrate_exits(model, xv, yv, budget=0.6, unit="fraction", method=method)
    with torch.inference_mode():
        cost = model(xt, mode="execute").cost.mean() / model.cost_profile().static_total
    assert float(cost) == pytest.approx(0.6, rel=0.03)


@pytest.mark.parametrize("unit", ["flops", "depth"])
def test_other_units(model, unit):
    x, y = _data(600, 3)
    profile = cost_model(model.cost_profile(), unit=unit)
    lo = float(profile.path_costs([True, False, True])[0])
    hi = float(profile.path_costs([False, False, True])[-1])
    budget = lo + 0.5 * (hi - lo)
    res = calibrate_exits(model, x, y, budget=budget, unit=unit)
    assert res.achieved == pytest.approx(budget, rel=0.03)
    assert res.unit == unit


def test_millisecond_budget_uses_measured_latency(model):
    x, y = _data(400, 4)
    latency = measure_latency_profile(model, x[:64], batch_size=16, repeats=3, warmup=1)
    assert all(t > 0 for t in latency.stage) and all(t > 0 for t in latency.head)
    lo = float(latency.path_costs([True, False, True])[0])
    hi = float(latency.path_costs([False, False, True])[-1])
    res = calibrate_exits(model, x, y, budget=(lo + hi) / 2, unit="ms", latency=latency, latency_batch_size=16)
    assert res.achieved == pytest.approx((lo + hi) / 2, rel=0.03)
    assert res.batch_size == 16
    with pytest.raises(ValueError, match="latency profile"):
        calibrate_exits(model, x, y, budget=(lo + hi) / 2, unit="ms")


def test_geometric_prior_shapes_exit_fractions(model):
    x, y = _data(2000, 5)
    low = calibrate_exits(model, x, y, budget=0.45, method="geometric")
    high = calibrate_exits(model, x, y, budget=0.85, method="geometric")
    assert low.exit_fractions[0] > high.exit_fractions[0]
    assert low.exit_fractions[-1] < high.exit_fractions[-1]
    q = low.extra["q"]
    assert q > 0
    # the fractions follow p_k ∝ q^k where every exit gets samples
    fr = low.exit_fractions
    assert fr[1] / fr[0] == pytest.approx(q, rel=0.15)


def test_assign_exits_first_hit_and_last_always():
    scores = torch.tensor([[0.9, 0.2, math.nan], [0.1, 0.8, math.nan], [0.1, 0.1, math.nan]])
    thr = torch.tensor([0.5, 0.5, -math.inf])
    assert assign_exits(scores, thr).tolist() == [0, 1, 2]


def test_thresholds_travel_with_the_checkpoint(model, tmp_path):
    x, y = _data(500, 6)
    res = calibrate_exits(model, x, y, budget=0.7, rule="entropy")
    path = save_model(model, tmp_path / "m.safetensors", extras={"calibration": res.to_dict()})
    loaded = load_model(path)
    torch.testing.assert_close(loaded.exit_thresholds, model.exit_thresholds)
    assert loaded.exit_rule.name == "entropy"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, mode="execute").cost, model(x, mode="execute").cost)


def test_statistics_reuse_matches_fresh_scoring(model):
    x, y = _data(300, 7)
    stats = collect_exit_statistics(model, x, y, rule="confidence")
    a = calibrate_exits(model, x, y, budget=0.6, stats=stats)
    b = calibrate_exits(model, x, y, budget=0.6)
    assert a.thresholds == b.thresholds
