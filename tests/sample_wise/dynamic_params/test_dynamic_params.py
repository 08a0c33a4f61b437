"""CondConv, dynamic convolution, hypernetwork and SE: grouped conv == per-sample conv, simulate == execute,
FLOPs exact against the counter, temperature annealing."""

import pytest
import torch
import torch.nn.functional as F

import dynaneural as dn
from dynaneural.compute.flops import count_flops
from dynaneural.contract import set_train_progress
from dynaneural.sample_wise.dynamic_params.dynamic_conv import DynamicConv2d
from dynaneural.sample_wise.dynamic_params.functional import fold_bn, per_sample_conv2d

MODELS = ["test_condconv", "test_dynamic_conv", "test_hypernetwork", "test_squeeze_excite"]


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_grouped_conv_equals_per_sample_conv(stride, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 9, 9, generator=g)
    w = torch.randn(5, 4, 3, 3, 3, generator=g)
    b = torch.randn(5, 4, generator=g)
    out = per_sample_conv2d(x, w, b, stride=stride, padding=padding)
    ref = torch.cat([F.conv2d(x[i:i + 1], w[i], b[i], stride=stride, padding=padding) for i in range(5)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        per_sample_conv2d(x, w[:4])


def test_fold_bn_matches_conv_then_bn():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    w, b = fold_bn(conv.weight, bn)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_simulate_equals_execute_after_training_steps(name):
    """Kernel mixing then one conv == every kernel's conv then mixing, also with trained (non-init) weights."""
    torch.manual_seed(0)
    m = dn.create_model(name)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        x = m.example_input(16)
        loss = F.cross_entropy(m(x, mode="train").logits, torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x = m.example_input(16)
    with torch.inference_mode():
        sim, exe = m(x, mode="simulate"), m(x, mode="execute")
    torch.testing.assert_close(sim.logits, exe.logits, rtol=1e-4, atol=1e-4)
    for k in sim.decisions:
        torch.testing.assert_close(sim.decisions[k], exe.decisions[k])


@pytest.mark.parametrize("name", MODELS + ["condconv_mnist", "dynamic_conv_cifar10", "hypernetwork_mnist"])
def test_ledger_equals_flops_counter(name):
    """The ledger equals ``count_flops`` (conv/BN/linear rules + the registered rules of the dynamic layers)."""
    m = dn.create_model(name).eval()
    x = m.example_input(3)
    with torch.inference_mode():
        out = m(x, mode="execute")
    report = count_flops(m, x)
    assert not report.uncounted
    torch.testing.assert_close(out.cost, torch.full_like(out.cost, report.total), rtol=1e-12, atol=0)


def test_dynamic_params_cost_only_slightly_above_static():
    from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, build_static_convnet

    static = count_flops(build_static_convnet(ConvNetConfig()), torch.zeros(1, 1, 28, 28)).total
    for name in ("condconv_mnist", "dynamic_conv_mnist", "hypernetwork_mnist", "se_convnet_mnist"):
        m = dn.create_model(name).eval()
        with torch.inference_mode():
            cost = float(m(m.example_input(1), mode="execute").cost[0])
        assert static < cost < 1.2 * static, name


def test_temperature_anneals_with_train_progress():
    layer = DynamicConv2d(in_chs=4, out_chs=4, stride=1, in_size=6, anneal_fraction=0.5)
    assert float(layer.tau) == 30.0
    layer.set_train_progress(0.25)
    assert float(layer.tau) == pytest.approx(15.5)
    layer.set_train_progress(0.9)
    assert float(layer.tau) == 1.0
    m = dn.create_model("test_dynamic_conv")
    set_train_progress(m, 1.0)
    assert all(float(lay.tau) == 1.0 for lay in m.layers)
    assert "layers.0.tau" in m.state_dict()  # the annealed temperature is checkpointed
    # a high temperature flattens the attention
    x = torch.randn(8, 4, 6, 6)
    layer.set_train_progress(0.0)
    flat = layer.attention(x)
    layer.set_train_progress(1.0)
    sharp = layer.attention(x)
    assert flat.max() - flat.min() < sharp.max() - sharp.min()


def test_condconv_routing_is_per_sample():
    m = dn.create_model("test_condconv").eval()
    x = m.example_input(8)
    r = m.layers[0].routing(m.stem(x))
    assert r.shape == (8, 4) and (r.std(0) > 0).all()
