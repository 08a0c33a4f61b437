"""Online budget control: the exit fractions (hence the mean cost) are held on a stream whose difficulty shifts."""

import pytest
import torch

import dynaneural as dn
from dynaneural.calibration import ExitBudgetController, calibrate_exits


@pytest.fixture
def calibrated():
    model = dn.create_model("test_exit_convnet").eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, 1, 8, 8, generator=g), torch.randint(0, 10, (3000,), generator=g)
    return model, calibrate_exits(model, x, y, budget=0.6, unit="fraction")


def _stream(model, step, x, batch_size=64):
    with torch.inference_mode():
        return torch.cat([step(x[i:i + batch_size]).cost for i in range(0, x.shape[0], batch_size)])


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_budget_held_on_a_shifted_stream(calibrated, scale):
    model, res = calibrated
    full = model.cost_profile().static_total
    x = torch.randn(6000, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * scale
    fixed = _stream(model, lambda b: model(b, mode="execute"), x).mean() / full
    assert abs(float(fixed) / 0.6 - 1) > 0.1  # the shift moves fixed thresholds far off the budget
    ctl = ExitBudgetController.from_calibration(model, res, window=1024)
    controlled = _stream(model, ctl, x).mean() / full
    assert float(controlled) == pytest.approx(0.6, rel=0.03)
    state = ctl.state
    assert state.samples == 6000
    assert state.mean_cost / full == pytest.approx(float(controlled), rel=1e-9)
    assert state.exit_fractions == pytest.approx(res.exit_fractions, abs=0.03)


def test_stationary_stream_keeps_the_calibration(calibrated):
    model, res = calibrated
    x = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ctl = ExitBudgetController.from_calibration(model, res, window=2048)
    _stream(model, ctl, x)
    assert ctl.state.thresholds[:-1] == pytest.approx(res.thresholds[:-1], abs=0.01)


def test_controller_feeds_on_simulate_outputs_too(calibrated):
    model, res = calibrated
    x = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2.0
    a = ExitBudgetController.from_calibration(model, res, window=256, min_samples=16)
    saved = model.exit_thresholds.clone()
    with torch.inference_mode():
        a.observe(model(x, mode="execute"))
        after_execute = model.exit_thresholds.clone()
        model.configure_exits(rule=model.exit_rule, thresholds=saved)
        b = ExitBudgetController.from_calibration(model, res, window=256, min_samples=16)
        b.observe(model(x, mode="simulate"))
    assert torch.equal(model.exit_thresholds, after_execute)  # same scores seen, same thresholds
    assert not torch.equal(after_execute, saved)


def test_disabled_exit_stays_disabled(calibrated):
    model, _ = calibrated
    model.configure_exits(rule="confidence", thresholds=[float("inf"), 0.13, 0.0])
    ctl = ExitBudgetController(model, exit_fractions=[0.0, 0.5, 0.5], window=64, min_samples=8)
    _stream(model, ctl, torch.randn(256, 1, 8, 8))
    thr = ctl.state.thresholds
    assert thr[0] == float("inf") and thr[1] != 0.13


@pytest.mark.parametrize("kwargs, match", [
    ({"exit_fractions": [0.5, 0.5]}, "expected 3 exit fractions"),
    ({"exit_fractions": [0.5, 0.4, 0.3]}, "sum to 1"),
    ({"exit_fractions": [-0.1, 0.6, 0.5]}, "non-negative"),
    ({"exit_fractions": [0.2, 0.3, 0.5], "window": 0}, ">= 1"),
    ({"exit_fractions": [0.2, 0.3, 0.5], "window": 8, "min_samples": 16}, "cannot exceed"),
])
def test_bad_arguments(calibrated, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExitBudgetController(calibrated[0], **kwargs)


def test_train_mode_output_is_refused(calibrated):
    model, res = calibrated
    ctl = ExitBudgetController.from_calibration(model, res)
    out = model(torch.randn(4, 1, 8, 8), mode="train")
    with pytest.raises(ValueError, match="reached_scores"):
        ctl.observe(out)
