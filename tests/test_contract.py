"""The contract every registered dynamic model keeps, walked over the registry's tiny ``test_*`` variants."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.calibration import calibrate_exits
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

# The multi-exit family's contract; tests/test_dynamic_contract.py covers every other dynamic model.
TEST_MODELS = [n for n in dn.list_models("test_*") if isinstance(dn.create_model(n), MultiExitNetwork)]


def _batch(model, n=24):
    return torch.randn(n, *model.input_shape)


def _spread_thresholds(model, x, rule="confidence"):
    """Thresholds at score quantiles of this batch, so samples leave at several different exits."""
    with torch.inference_mode():
        out = model(x, mode="simulate", rule=rule, thresholds=[1e30] * model.num_exits)
    thr = []
    for k in range(model.num_exits - 1):
        s = out.exit_scores[:, k]
        s = s[~torch.isnan(s)]
        q = float(s.quantile(0.7 - 0.2 * k / max(model.num_exits - 2, 1)))
        above = s[s > q]
        thr.append((q + float(above.min())) / 2 if above.numel() else q + 1e-3)  # between two scores
    return thr + [-math.inf]


def test_registry_has_test_variants():
    assert TEST_MODELS, "every method file registers a tiny test_* variant"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_train_mode_forward_backward(name):
    model = dn.create_model(name).train()
    x = _batch(model)
    out = model(x, mode="train")
    assert out.logits.shape == (x.shape[0], model.num_classes)
    loss = sum(torch.nn.functional.cross_entropy(lg, torch.zeros(x.shape[0], dtype=torch.long))
               for lg in (out.exit_logits or [out.logits]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_simulate_equals_execute(name, rule):
    model = dn.create_model(name).eval()
    x = _batch(model, 40)
    thr = _spread_thresholds(model, x, rule)
    with torch.inference_mode():
        sim = model(x, mode="simulate", rule=rule, thresholds=thr)
        exe = model(x, mode="execute", rule=rule, thresholds=thr)
    assert len(sim.exit_index.unique()) >= 2, "the test must exercise several exits"
    torch.testing.assert_close(exe.exit_index, sim.exit_index)
    torch.testing.assert_close(exe.cost, sim.cost, rtol=0, atol=0)
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_batched_equals_one_at_a_time(name):
    model = dn.create_model(name).eval()
    x = _batch(model, 16)
    thr = _spread_thresholds(model, x)
    with torch.inference_mode():
        batched = model(x, mode="execute", thresholds=thr)
        single = [model(x[i:i + 1], mode="execute", thresholds=thr) for i in range(x.shape[0])]
    torch.testing.assert_close(torch.cat([o.logits for o in single]), batched.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([o.exit_index for o in single]), batched.exit_index)
    torch.testing.assert_close(torch.cat([o.cost for o in single]), batched.cost)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_exits_disabled_equals_static_twin(name):
    model = dn.create_model(name).eval()
    model.disable_exits()
    x = _batch(model)
    with torch.inference_mode():
        out = model(x, mode="execute")
        ref = model.to_static()(x)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert (out.exit_index == model.num_exits - 1).all()
    assert torch.allclose(out.cost, torch.full_like(out.cost, model.cost_profile().static_total))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_cost_bounded_and_monotone_in_exit(name):
    model = dn.create_model(name).eval()
    x = _batch(model, 40)
    thr = _spread_thresholds(model, x)
    profile = model.cost_profile()
    with torch.inference_mode():
        out = model(x, mode="execute", thresholds=thr)
    enabled = [t != math.inf for t in thr]
    bound = profile.path_costs(enabled)[-1]
    assert (out.cost <= bound).all() and (out.cost > 0).all()
    # a sample leaving earlier never pays more than one leaving later
    order = out.exit_index.argsort()
    assert (out.cost[order].diff() >= 0).all()


@pytest.mark.parametrize("name", TEST_MODELS)
def test_calibrated_thresholds_meet_budget_on_calibration_split(name):
    model = dn.create_model(name).eval()
    x = _batch(model, 300)
    y = torch.randint(0, model.num_classes, (300,))
    for method in ("geometric", "search"):
        res = calibrate_exits(model, x, y, budget=0.75, unit="fraction", method=method)
        with torch.inference_mode():
            out = model(x, mode="execute")
        achieved = float(out.cost.mean()) / model.cost_profile().static_total
        assert achieved == pytest.approx(0.75, rel=0.03), (method, res)
