"""Bad input fails loudly with a clear message and leaves the model untouched."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.calibration import calibrate_exits


@pytest.fixture
def model():
    return dn.create_model("test_exit_convnet").eval()


@pytest.mark.parametrize("mode", ["train", "simulate", "execute"])
def test_wrong_shape(model, mode):
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)"):
        model(torch.randn(4, 3, 8, 8), mode=mode)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 8, 8), mode=mode)


def test_wrong_dtype(model):
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0]])


def test_nan_and_inf(model):
    x = torch.randn(4, 1, 8, 8)
    x[2, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite values in 1 of 4"):
        model(x)
    x[2, 0, 3, 3] = math.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(x, mode="simulate")


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 1, 8, 8))


def test_budget_out_of_range_keeps_previous_thresholds(model):
    x, y = torch.randn(100, 1, 8, 8), torch.randint(0, 10, (100,))
    before = model.exit_thresholds.clone()
    for bad in (0.0, 1.5, -1.0, math.nan):
        with pytest.raises(ValueError, match="budget"):
            calibrate_exits(model, x, y, budget=bad, unit="fraction")
    torch.testing.assert_close(model.exit_thresholds, before)
    with pytest.raises(ValueError, match="unit"):
        calibrate_exits(model, x, y, budget=0.5, unit="joules")


def test_bad_thresholds_and_rule(model):
    with pytest.raises(ValueError, match="expected 3 thresholds"):
        model.configure_exits(rule="confidence", thresholds=[0.5])
    with pytest.raises(ValueError, match="NaN"):
        model.configure_exits(rule="confidence", thresholds=[math.nan, 0.5, 0.0])
    with pytest.raises(ValueError, match="unknown exit rule"):
        model.configure_exits(rule="vibes", thresholds=[0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="exit_policy=True"):
        model.configure_exits(rule="learned", thresholds=[0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="unknown mode"):
        model(torch.randn(2, 1, 8, 8), mode="fast")


def test_deadline_below_cheapest_exit(model):
    with pytest.raises(ValueError, match="cheapest exit"):
        model(torch.randn(2, 1, 8, 8), max_flops=1.0)


def test_finite_check_is_exact_for_every_position_dtype_and_extreme():
    from dynaneural.validation import all_finite, check_batch

    big = torch.full((4, 3), 3e38)  # every value finite, their sum is not
    assert all_finite(big) and check_batch(big, input_shape=(3,)) is big
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(5, 7, dtype=dtype)
        assert all_finite(x)
        for bad in (float("nan"), float("inf"), float("-inf")):
            for pos in ((0, 0), (2, 3), (4, 6)):
                y = x.clone()
                y[pos] = bad
                assert not all_finite(y), (dtype, bad, pos)
    mixed = torch.tensor([[float("inf"), float("-inf")]])  # the sum is NaN, the values are not
    assert not all_finite(mixed)
    assert all_finite(torch.empty(0, 3)) and all_finite(torch.arange(6))
    assert not all_finite(torch.tensor([1 + 1j, complex(float("nan"), 0)]))
    with pytest.raises(ValueError, match="1 of 1 samples"):
        check_batch(mixed, input_shape=(2,))
