"""Gated dense block: gated-off connections are never read, both execute strategies agree with simulate, FLOPs
exact against the counter, budget loss and threshold calibration."""

import pytest
import torch

import dynaneural as dn
from dynaneural.compute.flops import static_flops
from dynaneural.sample_wise.dynamic_params.gated_dense import calibrate_connections


def _model(**kw):
    torch.manual_seed(0)
    return dn.create_model("test_gated_dense", **kw).eval()


@pytest.mark.parametrize("strategy", ["pattern", "connection"])
def test_strategies_match_simulate(strategy):
    m = _model(strategy=strategy)
    x = m.example_input(32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        sim, exe = m(x, mode="simulate"), m(x, mode="execute")
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exe.cost, sim.cost, rtol=0, atol=0)
    assert sim.decisions["connections"].shape == (32, 1 + 2 + 3)


def test_off_connections_are_not_read():
    """The convolutions' input channels equal the open connections' channels, per pattern group."""
    m = _model(strategy="pattern", threshold=0.5)
    x = m.example_input(16)
    seen = []
    orig = torch.nn.functional.conv2d

    def spy(inp, w, *a, **kw):
        seen.append((inp.shape[0], w.shape[1]))
        return orig(inp, w, *a, **kw)

    torch.nn.functional.conv2d = spy
    try:
        with torch.inference_mode():
            out = m(x, mode="execute")
    finally:
        torch.nn.functional.conv2d = orig
    gates = out.decisions["connections"]
    splits = [m.layers[i].splits for i in range(3)]
    read = sum(rows * chans for rows, chans in seen[1:])  # skip the stem conv (stem runs via its module)
    expected = 0
    start = 0
    for sp in splits:
        g = gates[:, start:start + len(sp)]
        expected += int((g.long() * torch.tensor(sp)).sum())
        start += len(sp)
    assert read == expected
    assert expected < 16 * sum(sum(sp) for sp in splits)


def test_cost_equals_counter():
    m = _model()
    x = m.example_input(8)
    static = m.to_static().eval()
    full = static_flops(static, x[:1])
    with torch.inference_mode():
        out = m(x, mode="execute")
    gates = out.decisions["connections"].double()
    conn = torch.tensor([c for row in m.conn_cost for c in row], dtype=torch.float64)
    gate_cost = sum(layer.gate_cost() for layer in m.layers)
    expected = full - conn.sum() + gates @ conn + gate_cost
    torch.testing.assert_close(out.cost, expected, rtol=1e-12, atol=0)


def test_budget_loss_and_calibration():
    m = _model(budget=0.3).train()
    out = m(m.example_input(8), mode="train")
    assert "budget" in out.aux_losses
    out.aux_losses["budget"].backward()
    assert m.layers[1].gate_bias.grad is not None
    m.eval()
    x = m.example_input(64)
    with torch.inference_mode(), m.all_on():
        full = float(m(x[:1], mode="execute").cost[0])
    with torch.inference_mode():
        lo = float(m.__class__.forward(m, x, mode="execute").cost.mean()) / full
    cal = calibrate_connections(m, x, budget=min(lo, 0.9))
    assert abs(cal.mean_cost / cal.target - 1) < 0.1
