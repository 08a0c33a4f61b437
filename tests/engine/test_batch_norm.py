import pytest
import torch
from torch import nn

from dynaneural.engine import recalibrate_batch_norm
from dynaneural.registry import create_model


def _static_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5))


def test_statistics_are_the_exact_averages_over_the_calibration_batches():
    net = _static_net()
    net[1].running_mean.fill_(7.0)  # stale statistics
    net[1].running_var.fill_(0.01)
    x = torch.randn(40, 3, 6, 6)
    net.train()
    rep = recalibrate_batch_norm(net, x, batch_size=20)
    assert (rep.layers, rep.samples, rep.batches, rep.mode) == (2, 40, 2, None)
    assert rep.max_mean_shift > 6.0
    with torch.no_grad():
        feats = [net[0](x[:20]), net[0](x[20:])]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 2
    # everything restored: train/eval state of every module, momentum; no parameter touched
    assert all(m.training for m in net.modules())
    assert net[1].momentum == 0.1 and net[4].momentum == 0.1


def test_dynamic_model_recalibrated_in_simulate_mode_still_matches_execute_mode():
    model = create_model("test_dynconv", seed=0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()  # statistics that do not fit the deployed masks
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    before = model(x, mode="simulate").logits
    rep = recalibrate_batch_norm(model, x, batch_size=16)
    assert rep.mode == "simulate" and rep.batches == 4 and rep.layers > 0
    assert not model.training
    with torch.no_grad():
        sim, exe = model(x, mode="simulate"), model(x, mode="execute")
    assert not torch.allclose(sim.logits, before)
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exe.cost, sim.cost)


def test_a_failing_pass_restores_the_previous_statistics():
    model = create_model("test_dynconv", seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.randn(8, 3, 9, 9)  # wrong spatial size: the model's input check raises
    with pytest.raises(ValueError):
        recalibrate_batch_norm(model, bad, batch_size=4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    assert all(bn.momentum == 0.1 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


@pytest.mark.parametrize("case", ["empty", "nan", "execute", "batch1", "no_bn"])
def test_bad_input_is_refused(case):
    net, x, kw = _static_net(), torch.randn(8, 3, 6, 6), {}
    if case == "empty":
        x = x[:0]
    elif case == "nan":
        x[0, 0, 0, 0] = float("nan")
    elif case == "execute":
        kw = {"mode": "execute"}
    elif case == "batch1":
        kw = {"batch_size": 1}
    else:
        net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError):
        recalibrate_batch_norm(net, x, **kw)
