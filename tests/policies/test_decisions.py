"""The decision toolkit: relaxations, temperature schedules, REINFORCE and budget losses."""

import math

import pytest
import torch

from dynaneural.policies import (
    BudgetLoss,
    ReinforceLoss,
    TemperatureSchedule,
    binary_decision,
    categorical_decision,
    gumbel_sigmoid,
    gumbel_softmax,
    sample_bernoulli,
    sample_categorical,
    straight_through,
)


def test_straight_through_forward_is_hard_backward_is_soft():
    soft = torch.tensor([0.2, 0.7], requires_grad=True)
    out = straight_through(soft > 0.5, soft)
    assert out.tolist() == [0.0, 1.0]
    (out * torch.tensor([3.0, 5.0])).sum().backward()
    assert soft.grad.tolist() == [3.0, 5.0]


def test_gumbel_sigmoid_frequency_matches_sigmoid():
    logits = torch.tensor([-1.0, 0.0, 2.0]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    hard = gumbel_sigmoid(logits, tau=1.0, hard=True, generator=g)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.mean(0), torch.sigmoid(logits[0]), atol=0.015, rtol=0)


def test_gumbel_softmax_frequency_matches_softmax_and_is_one_hot():
    logits = torch.tensor([0.0, 1.0, -1.0]).repeat(20000, 1)
    y = gumbel_softmax(logits, tau=0.5, hard=True, generator=torch.Generator().manual_seed(1))
    assert torch.all(y.sum(-1) == 1) and set(y.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(y.mean(0), torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_gumbel_relaxations_pass_gradients():
    logits = torch.zeros(4, 3, requires_grad=True)
    (gumbel_softmax(logits, tau=1.0, generator=torch.Generator().manual_seed(0)) * torch.arange(3.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    gate_logits = torch.zeros(8, requires_grad=True)
    gumbel_sigmoid(gate_logits, tau=0.5, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert gate_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_temperature_raises(bad):
    with pytest.raises(ValueError, match="tau"):
        gumbel_sigmoid(torch.zeros(2), tau=bad)
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(torch.zeros(2, 2), tau=bad)


def test_binary_decision_inference_threshold_and_training_values():
    logits = torch.tensor([-2.0, 0.0, 2.0])
    d = binary_decision(logits, training=False, threshold=0.6)
    assert d.hard.tolist() == [False, False, True] and d.value.tolist() == [0.0, 0.0, 1.0]
    lg = logits.clone().requires_grad_(True)
    st = binary_decision(lg, training=True, relaxation="straight_through")
    assert st.hard.tolist() == [False, True, True]
    st.value.sum().backward()
    torch.testing.assert_close(lg.grad, torch.sigmoid(logits) * (1 - torch.sigmoid(logits)))
    gb = binary_decision(logits, training=True, relaxation="gumbel", generator=torch.Generator().manual_seed(0))
    assert torch.equal(gb.hard, gb.value > 0.5)
    with pytest.raises(ValueError, match="relaxation"):
        binary_decision(logits, training=True, relaxation="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        binary_decision(logits, training=False, threshold=1.5)


def test_categorical_decision_argmax_at_inference():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    d = categorical_decision(logits, training=False)
    assert d.hard.tolist() == [1, 0]
    torch.testing.assert_close(d.value, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    t = categorical_decision(logits, training=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t.hard, t.value.argmax(-1))


def test_temperature_schedules():
    assert TemperatureSchedule(start=5.0).__call__(0.7) == 5.0
    lin = TemperatureSchedule(start=5.0, end=1.0, kind="linear")
    assert lin(0.0) == 5.0 and lin(1.0) == 1.0 and lin(0.5) == 3.0 and lin(2.0) == 1.0
    exp = TemperatureSchedule(start=4.0, end=1.0, kind="exponential")
    assert math.isclose(exp(0.5), 2.0)
    cos = TemperatureSchedule(start=3.0, end=1.0, kind="cosine")
    assert math.isclose(cos(0.0), 3.0) and math.isclose(cos(1.0), 1.0) and math.isclose(cos(0.5), 2.0)
    with pytest.raises(ValueError):
        TemperatureSchedule(start=0.0)
    with pytest.raises(ValueError):
        TemperatureSchedule(kind="step")  # type: ignore[arg-type]


def test_sample_bernoulli_log_prob_and_entropy():
    logits = torch.tensor([[0.0, 2.0]])
    s = sample_bernoulli(logits, greedy=True)
    p = torch.sigmoid(logits)
    assert s.actions.tolist() == [[1.0, 1.0]]
    torch.testing.assert_close(s.log_prob, torch.log(p).sum(1), atol=1e-6, rtol=0)
    ent = -(p * p.log() + (1 - p) * (1 - p).log()).sum(1)
    torch.testing.assert_close(s.entropy, ent, atol=1e-6, rtol=0)
    mixed = sample_bernoulli(torch.full((1, 1), 50.0), greedy=True, exploration=0.2)
    torch.testing.assert_close(mixed.log_prob.exp(), torch.tensor([0.9]), atol=1e-5, rtol=0)


def test_sample_bernoulli_free_mask_forces_the_other_decisions_on_without_gradient():
    logits = torch.full((6, 3), -3.0, requires_grad=True)  # every decision would mostly be "off"
    free = torch.tensor([False, False, True])
    s = sample_bernoulli(logits, generator=torch.Generator().manual_seed(0), free=free)
    assert (s.actions[:, :2] == 1).all()
    ref = sample_bernoulli(logits[:, 2:], generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid(logits[:, 2])
    a = s.actions[:, 2]
    torch.testing.assert_close(s.log_prob, a * p.log() + (1 - a) * (1 - p).log(), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.entropy, ref.entropy, atol=1e-6, rtol=0)
    s.log_prob.sum().backward()
    assert (logits.grad[:, :2] == 0).all() and (logits.grad[:, 2] != 0).all()
    with pytest.raises(ValueError, match="bool"):
        sample_bernoulli(logits, free=torch.ones(3))
    with pytest.raises(ValueError, match="broadcast"):
        sample_bernoulli(logits, free=torch.ones(4, dtype=torch.bool))


def test_sample_categorical_is_reproducible_and_greedy():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    a = sample_categorical(logits, generator=torch.Generator().manual_seed(3))
    b = sample_categorical(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.actions, b.actions)
    g = sample_categorical(logits, greedy=True)
    assert torch.equal(g.actions, logits.argmax(-1))
    torch.testing.assert_close(g.log_prob, torch.log_softmax(logits, -1).max(-1).values)


def test_reinforce_moves_policy_toward_rewarded_action():
    """A two-armed bandit: arm 1 pays 1, arm 0 pays 0; REINFORCE with a moving-average baseline learns arm 1."""
    torch.manual_seed(0)
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    crit = ReinforceLoss(baseline="moving_average", momentum=0.9, entropy_coef=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        s = sample_categorical(logits.expand(64, 2), generator=g)
        out = crit(s, s.actions.float())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert torch.softmax(logits, 0)[1] > 0.9
    assert 0.0 < float(crit.running_reward) <= 1.0


def test_reinforce_learned_baseline_and_errors():
    s = sample_bernoulli(torch.zeros(4, 3, requires_grad=True), generator=torch.Generator().manual_seed(0))
    value = torch.zeros(4, requires_grad=True)
    out = ReinforceLoss(baseline="learned")(s, torch.ones(4), value=value)
    out["loss"].backward()
    assert value.grad is not None and float(out["baseline_loss"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="value"):
        ReinforceLoss(baseline="learned")(s, torch.ones(4))
    with pytest.raises(ValueError):
        ReinforceLoss(baseline="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ReinforceLoss(momentum=1.0)


def test_reinforce_gradient_is_unbiased_on_average():
    """E[(R - b) grad log p] equals the exact gradient of E[R] for a Bernoulli policy (large batch)."""
    theta = torch.tensor([0.3], requires_grad=True)
    reward_on, reward_off = 2.0, -1.0
    s = sample_bernoulli(theta.expand(200000, 1), generator=torch.Generator().manual_seed(0))
    r = torch.where(s.actions[:, 0] > 0, reward_on, reward_off)
    ReinforceLoss(baseline="none")(s, r)["loss"].backward()
    p = torch.sigmoid(torch.tensor(0.3))
    exact = -(reward_on - reward_off) * p * (1 - p)  # d(-E[R])/d theta
    assert theta.grad.item() == pytest.approx(float(exact), abs=0.01)


def test_budget_losses():
    cost = torch.tensor([0.2, 0.6], requires_grad=True)
    sq = BudgetLoss(target=0.5, weight=2.0)(cost, 1.0)
    assert float(sq.detach()) == pytest.approx(2.0 * (0.4 - 0.5) ** 2)
    sq.backward()
    assert cost.grad is not None
    assert float(BudgetLoss(target=0.5, kind="hinge")(torch.tensor([0.2, 0.6]))) == 0.0
    assert float(BudgetLoss(target=0.3, kind="hinge")(torch.tensor([0.2, 0.6]))) == pytest.approx(0.01)
    rates = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # per-gate rates 1.0 and 0.5
    assert float(BudgetLoss(target=0.5, kind="per_gate")(rates)) == pytest.approx((0.25 + 0.0) / 2)
    with pytest.raises(ValueError):
        BudgetLoss(target=0.5, kind="per_gate")(torch.ones(3))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="target"):
            BudgetLoss(target=bad)


def test_binary_decision_threshold_holds_for_saturated_gates():
    logits = torch.tensor([20.0, 40.0, -40.0])  # sigmoid rounds the first two to exactly 1.0 in float32
    assert binary_decision(logits, training=False, threshold=1.0).hard.tolist() == [False, False, False]
    assert binary_decision(logits, training=False, threshold=0.0).hard.tolist() == [True, True, True]
    near_one = 1 - 1e-12  # between the two saturated logits' true probabilities
    assert binary_decision(logits.double(), training=False, threshold=near_one).hard.tolist() == [False, True, False]
