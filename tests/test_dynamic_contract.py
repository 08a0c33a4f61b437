"""The contract of every dynamic model other than the multi-exit family (tests/test_contract.py covers those),
walked over the registry's tiny ``test_*`` variants: see :mod:`dynaneural.contract`."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.compute.flops import static_flops
from dynaneural.contract import DynamicModel, example_input
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork


def _dynamic_test_models():
    names = []
    for name in dn.list_models("test_*"):
        m = dn.create_model(name)
        if isinstance(m, DynamicModel) and not isinstance(m, MultiExitNetwork):
            names.append(name)
    return names


MODELS = _dynamic_test_models()


def _batch(model, n, seed=0):
    return example_input(model, n, generator=torch.Generator().manual_seed(seed))


def _varied(decisions):
    return any(t.numel() and t.flatten(1).unique(dim=0).shape[0] > 1 if t.dim() > 1 else t.unique().numel() > 1
               for t in decisions.values())


@pytest.mark.parametrize("name", MODELS)
def test_train_forward_backward(name):
    model = dn.create_model(name).train()
    x = _batch(model, 12)
    out = model(x, mode="train")
    assert out.logits.shape == (12, model.num_classes)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.zeros(12, dtype=torch.long))
    for k, v in out.aux_losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
        loss = loss + v
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_simulate_equals_execute(name):
    model = dn.create_model(name).eval()
    x = _batch(model, 32)
    with torch.inference_mode():
        sim = model(x, mode="simulate")
        exe = model(x, mode="execute")
    assert _varied(sim.decisions), "the tiny variant must take different decisions for different samples"
    assert sim.decisions.keys() == exe.decisions.keys()
    for k in sim.decisions:
        torch.testing.assert_close(exe.decisions[k], sim.decisions[k], msg=k)
    assert sim.cost.dtype == torch.float64 and sim.cost.shape == (32,)
    torch.testing.assert_close(exe.cost, sim.cost, rtol=1e-9, atol=0)
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_batched_equals_one_at_a_time(name):
    model = dn.create_model(name).eval()
    x = _batch(model, 8, seed=1)
    with torch.inference_mode():
        batched = model(x, mode="execute")
        single = [model(x[i:i + 1], mode="execute") for i in range(8)]
    torch.testing.assert_close(torch.cat([o.logits for o in single]), batched.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([o.cost for o in single]), batched.cost, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_all_on_equals_static_twin(name):
    model = dn.create_model(name).eval()
    if not model.has_static_twin:
        pytest.skip(f"{name} has no static twin (see its docstring)")
    x = _batch(model, 6, seed=2)
    static = model.to_static().eval()
    with torch.inference_mode(), model.all_on():
        out = model(x, mode="execute")
        ref = static(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref.logits
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    full = static_flops(static, x[:1])
    torch.testing.assert_close(out.cost, torch.full_like(out.cost, full), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_cost_is_positive_and_finite(name):
    model = dn.create_model(name).eval()
    with torch.inference_mode():
        out = model(_batch(model, 8), mode="execute")
    assert torch.isfinite(out.cost).all() and (out.cost > 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_bad_input_is_rejected(name):
    model = dn.create_model(name).eval()
    x = _batch(model, 4)
    with pytest.raises(ValueError, match="empty"):
        model(x[:0], mode="execute")
    if x.is_floating_point():
        x = x.clone()
        x.view(4, -1)[1, 0] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            model(x, mode="execute")
        with pytest.raises(TypeError):
            model(x.long(), mode="execute")
    with pytest.raises(ValueError):
        model(x.reshape(1, -1) if x.dim() > 2 else x[:, :1, None], mode="execute")
