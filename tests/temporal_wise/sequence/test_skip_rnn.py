"""Skip RNN: the schedule, the paper's accumulated update probability, gradients, costs and the knob."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.temporal_wise.sequence.skip_rnn import (
    SkipRNN,
    SkipRNNConfig,
    _execute_loop,
    _execute_rounds,
    steps_to_next_update,
)


def _x(model, n=16, seed=0):
    return model.example_input(n, generator=torch.Generator().manual_seed(seed))


def test_schedule_is_the_smallest_step_reaching_the_threshold():
    p = torch.tensor([1.0, 0.5, 0.49, 0.26, 0.25, 0.1, 1e-9])
    k = steps_to_next_update(p, 0.5, 100)
    for pi, ki in zip(p.tolist(), k.tolist(), strict=True):
        want = min(100, max(1, math.ceil(0.5 / pi)))
        assert ki == want


def test_decisions_follow_the_papers_recursion():
    """Replay the paper's running sum ũ_{t+1} = ũ_t + min(p, 1 - ũ_t) from the simulated states."""
    model = dn.create_model("test_skip_lstm").eval()
    x = _x(model)
    with torch.inference_mode():
        out = model(x, mode="simulate")
    upd = out.decisions["updates"]
    assert upd[:, 0].all()  # ũ_1 = 1
    # Between two updates, the number of skipped steps is constant given p: check ũ as reported is min(k·p, 1)
    cum = out.update_prob
    for b in range(x.shape[0]):
        ts = upd[b].nonzero().squeeze(1).tolist()
        for a, z in zip(ts, ts[1:], strict=False):
            p = float(cum[b, a + 1])  # one step after an update, ũ = p
            for t in range(a + 1, z + 1):
                assert cum[b, t].item() == pytest.approx(min((t - a) * p, 1.0), rel=1e-5)
            assert all(cum[b, t] < model.threshold for t in range(a + 1, z))
            assert cum[b, z] >= model.threshold


@pytest.mark.parametrize("name", ["test_skip_lstm", "test_skip_gru"])
@pytest.mark.parametrize("schedule", ["rounds", "steps"])
def test_execute_equals_eager_loop_and_simulate(name, schedule):
    """Both execute schedules, scripted and eager, give simulate's decisions, logits and per-sample cost."""
    model = dn.create_model(name).eval()
    model.schedule = schedule
    x = _x(model, 24)
    with torch.inference_mode():
        sim = model(x, mode="simulate")
        model.script = False
        eager = model(x, mode="execute")
        model.script = True
        scripted = model(x, mode="execute")
    for out in (eager, scripted):
        torch.testing.assert_close(out.decisions["updates"], sim.decisions["updates"])
        torch.testing.assert_close(out.logits, sim.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.cost, sim.cost, rtol=0, atol=0)
    upd = sim.decisions["updates"].sum(1)
    assert 0.2 < float(sim.decisions["updates"].float().mean()) < 0.95
    assert int(upd.min()) < int(upd.max())  # samples take different numbers of updates: rounds shrink


def test_rounds_run_each_update_once_and_no_more_rounds_than_the_busiest_sample():
    """The round schedule calls the cell once per round with the rows that still have an update left."""
    model = dn.create_model("test_skip_gru").eval()
    x = _x(model, 32)
    calls: list[int] = []
    real = torch.gru_cell

    def counting(xt, *args):
        calls.append(xt.shape[0])
        return real(xt, *args)

    bb = model.backbone
    torch.gru_cell = counting
    try:
        with torch.inference_mode():
            h, upd = _execute_rounds(x, None, *bb.cell_weights(), model.gate.weight[0], model.gate.bias, 0.5, False)
    finally:
        torch.gru_cell = real
    per_sample = upd.sum(1)
    assert sum(calls) == int(per_sample.sum())  # every update computed exactly once, nothing else
    assert len(calls) == int(per_sample.max())  # one call per round
    assert calls[0] == x.shape[0] and calls == sorted(calls, reverse=True)


def test_straight_through_gradient_reaches_the_gate_and_budget_loss():
    model = dn.create_model("test_skip_gru").train()
    out = model(_x(model), mode="train")
    assert "budget" in out.aux_losses
    (out.logits.sum() + out.aux_losses["budget"]).backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0


def test_cost_counts_only_steps_that_ran():
    model = dn.create_model("test_skip_lstm").eval()
    x = _x(model)
    with torch.inference_mode():
        out = model(x, mode="execute")
    bb = model.backbone
    upd = out.decisions["updates"]
    want = upd.sum(1).double() * bb.step_flops + upd[:, :-1].sum(1).double() * bb.hidden_size + bb.head_flops
    torch.testing.assert_close(out.cost, want, rtol=0, atol=0)
    assert set(out.cost_by_part) == {"cell", "gate", "head"}


def test_a_sample_that_never_updates_again_costs_one_step():
    model = SkipRNN(SkipRNNConfig(input_size=4, hidden_size=8, num_classes=2, max_len=20, gate_bias=-100.0)).eval()
    with torch.no_grad():
        model.gate.weight.zero_()
    x = torch.randn(3, 20, 4)
    with torch.inference_mode():
        out = model(x, mode="execute")
    assert out.decisions["updates"].sum(1).tolist() == [1, 1, 1]
    bb = model.backbone
    assert out.cost.tolist() == [bb.step_flops + bb.hidden_size + bb.head_flops] * 3


def test_threshold_knob_is_monotone():
    model = dn.create_model("test_skip_lstm").eval()
    x = _x(model, 32)
    fracs = []
    for th in (0.2, 0.5, 0.9):
        model.set_threshold(th)
        with torch.inference_mode():
            fracs.append(float(model(x, mode="execute").decisions["updates"].float().mean()))
    assert fracs[0] >= fracs[1] >= fracs[2] and fracs[0] > fracs[2]
    with pytest.raises(ValueError):
        model.set_threshold(0.0)


def test_static_twin_is_the_fused_rnn():
    model = dn.create_model("test_skip_gru")
    static = model.to_static()
    assert isinstance(static.rnn, torch.nn.GRU)
    assert torch.equal(static.rnn.weight_hh_l0, model.backbone.rnn.weight_hh_l0)


@pytest.mark.parametrize("loop", [_execute_loop, _execute_rounds])
def test_loop_handles_single_step_sequences(loop):
    model = dn.create_model("test_skip_lstm").eval()
    x = _x(model)[:, :1]
    bb = model.backbone
    h, upd = loop(x, bb.embed.weight, *bb.cell_weights(), model.gate.weight[0], model.gate.bias, 0.5, True)
    assert upd.all() and h.shape == (x.shape[0], bb.hidden_size)


@pytest.mark.parametrize("schedule", ["rounds", "steps"])
def test_execute_loops_compile_with_torchscript(schedule):
    """The scripted loop must really be scripted: a scripting error falls back to eager silently at run time."""
    from dynaneural.temporal_wise.sequence.skip_rnn import _scripted_loop

    assert isinstance(_scripted_loop(schedule), torch.jit.ScriptFunction)


def test_packed_onednn_gemm_matches_addmm():
    """The oneDNN packed-weight GEMM (CPU float32) and addmm give the same decisions and states."""
    from dynaneural.layers.lstm import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear ops")
    model = SkipRNN(SkipRNNConfig(input_size=12, hidden_size=32, num_classes=3, max_len=20)).eval()
    with torch.no_grad():
        model.gate.weight.mul_(8.0 / float(model.gate.weight.norm()))
    x = torch.randn(40, 20, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.pack = True
        packed = model(x, mode="execute")
        model.pack = False
        plain = model(x, mode="execute")
        sim = model(x, mode="simulate")
    torch.testing.assert_close(packed.decisions["updates"], plain.decisions["updates"])
    torch.testing.assert_close(packed.decisions["updates"], sim.decisions["updates"])
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.logits, sim.logits, rtol=1e-4, atol=1e-4)


def test_execute_with_grad_mode_on_runs_without_the_packed_op():
    """Execute mode is for inference, but a forward with grad mode on (no inference_mode) must still run: the
    packed oneDNN op, which has no autograd formula, is then replaced by addmm, with the same result."""
    model = SkipRNN(SkipRNNConfig(input_size=6, hidden_size=16, num_classes=3, max_len=10)).eval()
    x = torch.randn(8, 10, 6)
    assert torch.is_grad_enabled() and not model._use_packed_gemm()
    out = model(x, mode="execute")
    with torch.inference_mode():
        from dynaneural.layers.lstm import onednn_linear_available

        assert model._use_packed_gemm() == onednn_linear_available()
        again = model(x, mode="execute")
    torch.testing.assert_close(again.logits, out.logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.decisions["updates"], out.decisions["updates"])
