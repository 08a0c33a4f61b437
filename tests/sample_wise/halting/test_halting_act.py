"""ACT (Graves 2016): halting sums, remainder, ponder-cost gradient, compaction in execute mode, calibration."""

import math

import pytest
import torch

from dynaneural.sample_wise.halting import (
    AdaptiveComputationTime,
    RecurrentBody,
    ResidualBody,
    act_halting,
    calibrate_act_eps,
)


def _rnn_act(max_steps=6, eps=0.01, tau=0.01, seq_len=None):
    torch.manual_seed(3)
    body = RecurrentBody(input_size=7, seq_len=seq_len, hidden_size=16, num_classes=2, halt_bias=-0.5,
                         halt_init_std=1.0)
    return AdaptiveComputationTime(body, max_steps=max_steps, eps=eps, tau=tau)


def test_act_halting_hand_example():
    h = torch.tensor([[0.3, 0.5, 0.4], [0.995, 0.1, 0.1], [0.2, 0.2, 0.2]])
    steps, rem, p = act_halting(h, threshold=0.99)
    assert steps.tolist() == [3, 1, 4]
    torch.testing.assert_close(rem, torch.tensor([0.2, 1.0, 0.4]))
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.5, 0.2, 0.0], [1.0, 0, 0, 0], [0.2, 0.2, 0.2, 0.4]]))


def test_act_halting_identities_on_random_probabilities():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(500, 9, generator=g) * 0.6
    thr = 0.99
    steps, rem, p = act_halting(h, threshold=thr)
    torch.testing.assert_close(p.sum(1), torch.ones(500))
    csum = torch.cat([torch.zeros(500, 1), h.cumsum(1)], 1)  # csum[:, n] = sum of the first n h
    n = steps
    torch.testing.assert_close(rem, 1 - csum[torch.arange(500), n - 1])
    assert (csum[torch.arange(500), n - 1] < thr).all()  # not halted before N
    halted_early = n < 10
    assert (csum[torch.arange(500), n][halted_early] >= thr - 1e-6).all()  # the halting sum reached 1 - eps at N
    assert (rem > 0).all() and (rem <= 1).all()
    for b in range(20):
        k = int(n[b])
        torch.testing.assert_close(p[b, :k - 1], h[b, :k - 1])
        assert (p[b, k:] == 0).all()


def test_act_halting_never_halts_with_infinite_threshold():
    h = torch.full((4, 5), 0.9)
    steps, rem, p = act_halting(h, threshold=math.inf)
    assert (steps == 6).all()
    torch.testing.assert_close(rem, torch.full((4,), 1 - 4.5))


def test_ponder_cost_gradient_flows_through_the_remainder_only():
    model = _rnn_act().train()
    x = torch.randn(16, 7)
    out = model(x, mode="train")
    out.aux_losses["ponder"].backward()
    # Reference: N is constant, R = 1 - sum_{n<N} h^n, so d(N + R)/d b_h = -sum_{n<N} h^n (1 - h^n).
    with torch.no_grad():
        s, hs = torch.zeros(16, 16), []
        for n in range(1, model.max_steps):
            s = model.body.step(x, s, first=n == 1)
            hs.append(torch.sigmoid(model.body.halting(s)))
        h = torch.stack(hs, 1)
        steps = out.decisions["steps"]
        mask = torch.arange(1, model.max_steps).unsqueeze(0) < steps.unsqueeze(1)
        expected = -model.tau * (h * (1 - h) * mask).sum() / 16
        torch.testing.assert_close(out.ponder_cost, steps.float() + out.remainder[:, 0])
    assert steps.unique().numel() > 1
    torch.testing.assert_close(model.body.halt.bias.grad[0], expected, rtol=1e-4, atol=1e-7)


def test_execute_compacts_the_batch_every_ponder_step():
    model = _rnn_act(max_steps=8).eval()
    rows = []
    handle = model.body.cell.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    x = torch.randn(64, 7)
    with torch.inference_mode():
        out = model(x, mode="execute")
    handle.remove()
    steps = out.decisions["steps"]
    expected = [int((steps >= n).sum()) for n in range(1, int(steps.max()) + 1)]
    assert rows == expected  # only the samples still pondering run step n
    assert sum(rows) == int(steps.sum()) < 64 * model.max_steps
    assert rows[0] == 64 and rows[-1] < 64


def test_simulate_runs_every_step_and_masks():
    model = _rnn_act(max_steps=8).eval()
    rows = []
    handle = model.body.cell.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    x = torch.randn(32, 7)
    with torch.inference_mode():
        sim = model(x, mode="simulate")
        handle.remove()
        exe = model(x, mode="execute")
    assert rows == [32] * 8
    assert torch.equal(sim.decisions["steps"], exe.decisions["steps"])
    torch.testing.assert_close(sim.remainder, exe.remainder)
    torch.testing.assert_close(sim.cost, exe.cost, rtol=0, atol=0)


def test_sequence_input_ponders_at_every_input_step():
    model = _rnn_act(max_steps=5, seq_len=4).eval()
    x = torch.randn(10, 4, 7)
    with torch.inference_mode():
        out = model(x, mode="execute")
    c = model.body.costs
    assert out.steps_per_input.shape == (10, 4) and (out.steps_per_input >= 1).all()
    n = out.steps_per_input.double()
    expected = c.encode + (n * c.step + n.clamp(max=4) * c.halting).sum(1) + c.readout
    torch.testing.assert_close(out.cost, expected, rtol=0, atol=0)


def test_one_step_is_the_network_without_act():
    model = _rnn_act(max_steps=1).eval()
    x = torch.randn(8, 7)
    with torch.inference_mode():
        out = model(x, mode="execute")
        ref = model.body.readout(model.body.step(x, torch.zeros(8, 16), first=True))
    assert (out.decisions["steps"] == 1).all()
    torch.testing.assert_close(out.ponder_cost, torch.full((8,), 2.0))
    torch.testing.assert_close(out.logits, ref)


def test_residual_body_state_shapes_and_cost():
    torch.manual_seed(0)
    body = ResidualBody(in_chans=1, input_size=8, width=4, num_classes=3)
    model = AdaptiveComputationTime(body, max_steps=3).eval()
    assert body.costs.step == 2 * (4 * 4 * 9 * 16) + 2 * 2 * 4 * 16  # two 3x3 convs + two BNs on 4x4x4
    with torch.inference_mode():
        out = model(torch.randn(5, 1, 8, 8))
    assert out.logits.shape == (5, 3)


def test_calibrate_eps_meets_a_step_budget_and_rejects_unreachable_ones():
    model = _rnn_act(max_steps=8).eval()
    x = torch.randn(256, 7)
    cal = calibrate_act_eps(model, x, budget=2.5, unit="steps")
    assert model.eps == cal.knob
    with torch.inference_mode():
        steps = model(x, mode="execute").decisions["steps"].double().mean()
    assert abs(float(steps) - 2.5) < 0.25
    before = model.eps
    with pytest.raises(ValueError, match="out of range"):
        calibrate_act_eps(model, x, budget=50.0, unit="steps")
    assert model.eps == before
