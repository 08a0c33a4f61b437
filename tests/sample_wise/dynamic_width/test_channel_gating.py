"""FBS channel gating: top-k masks, exact FLOPs against the counter, execute skips pruned channels."""

import pytest
import torch

import dynaneural as dn
from dynaneural.compute.flops import count_flops, static_flops
from dynaneural.layers import ConvBNAct
from dynaneural.sample_wise.dynamic_width.channel_gating import ChannelGatedCNN, ChannelGatingConfig


def _model(**kw):
    torch.manual_seed(0)
    return ChannelGatedCNN(ChannelGatingConfig(in_chans=1, input_size=8, widths=(6, 8, 8), strides=(1, 2, 1),
                                               **kw)).eval()


def test_masks_keep_exactly_k_channels_per_sample():
    m = _model(keep=(0.5, 0.5, 0.75))
    out = m(m.example_input(16), mode="simulate")
    assert [int(v) for v in out.decisions["gate0"].sum(1).unique()] == [3]
    assert [int(v) for v in out.decisions["gate2"].sum(1).unique()] == [6]
    assert out.decisions["gate1"].flatten(1).unique(dim=0).shape[0] > 1  # channels differ between samples


def test_cost_equals_counter_on_the_compact_network():
    """The ledger's cost equals the FLOPs counter on the plain CNN of the kept widths plus the predictors."""
    m = _model(keep=(1.0, 0.5, 0.5))
    x = m.example_input(4)
    with torch.inference_mode():
        cost = m(x, mode="execute").cost
    kept = [6, 4, 4]
    body = torch.nn.Sequential(ConvBNAct(1, 6), ConvBNAct(6, 4, stride=2), ConvBNAct(4, 4),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    expected = static_flops(body, x[:1])
    for k_in, c_out, size in [(kept[0], 8, 8), (kept[1], 8, 4)]:  # predictors of layers 1 and 2
        pred = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(k_in, c_out))
        expected += static_flops(pred, torch.zeros(1, k_in, size, size))
    torch.testing.assert_close(cost, torch.full_like(cost, expected), rtol=0, atol=0)
    full = static_flops(m.to_static(), x[:1])
    assert cost[0] < 0.55 * full


def test_execute_never_computes_pruned_channels():
    """The per-sample kernels in execute mode are (k_out, k_in): the grouped conv only sees kept channels."""
    m = _model(keep=(0.5, 0.5, 0.5))
    seen = []
    orig = torch.nn.functional.conv2d

    def spy(x, w, *a, **kw):
        seen.append(tuple(w.shape))
        return orig(x, w, *a, **kw)

    torch.nn.functional.conv2d = spy
    try:
        with torch.inference_mode():
            m(m.example_input(5), mode="execute")
    finally:
        torch.nn.functional.conv2d = orig
    assert seen == [(5 * 3, 1, 3, 3), (5 * 4, 3, 3, 3), (5 * 4, 4, 3, 3)]  # (B·k_out, k_in, 3, 3), groups = B


def test_train_gradients_reach_the_predictors():
    m = _model(keep=(1.0, 0.5, 0.5)).train()
    out = m(m.example_input(8), mode="train")
    out.logits.square().sum().backward()
    assert m.layers[1].predictor.weight.grad.abs().sum() > 0


def test_set_keep_changes_cost_and_validates():
    m = dn.create_model("test_channel_gating")
    x = m.example_input(3)
    with torch.inference_mode():
        c1 = m(x, mode="execute").cost[0]
        m.set_keep(0.25)
        c2 = m(x, mode="execute").cost[0]
    assert c2 < c1
    with pytest.raises(ValueError):
        m.set_keep(0.0)


def test_registered_variants_build():
    for name in ("channel_gating_mnist", "channel_gating_cifar10"):
        m = dn.create_model(name).eval()
        with torch.inference_mode():
            out = m(m.example_input(2), mode="execute")
        assert out.logits.shape == (2, 10)
        report = count_flops(m.to_static(), m.example_input(1))
        assert out.cost[0] < report.total
