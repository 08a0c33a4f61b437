"""PonderNet (Banino et al. 2021): halting distribution, geometric prior and KL, expected loss, sampling,
threshold rule, compaction in execute mode, calibration."""

import math

import pytest
import torch
import torch.nn.functional as F

from dynaneural.sample_wise.halting import (
    PonderNet,
    PonderNetLoss,
    RecurrentBody,
    calibrate_pondernet_threshold,
    geometric_prior,
    halting_distribution,
    kl_to_geometric,
)


def _logit(p):
    return math.log(p / (1 - p))


def _model(max_steps=6, **kw):
    torch.manual_seed(5)
    body = RecurrentBody(input_size=7, seq_len=None, hidden_size=16, num_classes=2, cell="gru",
                         first_step_flag=False, halt_bias=-1.0, halt_init_std=1.5)
    return PonderNet(body, max_steps=max_steps, **kw)


def test_halting_distribution_hand_example():
    z = torch.tensor([[_logit(0.5), _logit(0.25)]])
    p = halting_distribution(z).exp()
    # p1 = 0.5, p2 = 0.25 * 0.5, p3 = (1 - 0.5)(1 - 0.25) (lambda_3 = 1)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.125, 0.375]]))
    big = halting_distribution(torch.randn(50, 19) * 4).exp()
    torch.testing.assert_close(big.sum(1), torch.ones(50))


def test_geometric_prior_and_kl_against_hand_computation():
    prior = geometric_prior(0.5, 3)
    torch.testing.assert_close(prior, torch.tensor([0.5, 0.25, 0.125]) / 0.875)
    log_p = torch.tensor([[0.5, 0.125, 0.375]]).log()
    q = [0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875]
    hand = sum(pn * math.log(pn / qn) for pn, qn in zip([0.5, 0.125, 0.375], q, strict=True))
    torch.testing.assert_close(kl_to_geometric(log_p, 0.5), torch.tensor(hand))
    assert float(kl_to_geometric(prior.log().unsqueeze(0), 0.5)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        geometric_prior(0.0, 3)


def test_train_mode_loss_is_the_expectation_over_halting_steps():
    model = _model(beta=0.1, lambda_p=0.3).train()
    x, y = torch.randn(12, 7), torch.randint(0, 2, (12,))
    out = model(x, mode="train")
    parts = PonderNetLoss()(out, y)
    p = out.log_halt_probs.exp()
    hand = sum(p[:, n] * F.cross_entropy(out.step_logits[:, n], y, reduction="none") for n in range(6)).mean()
    torch.testing.assert_close(parts["loss"], hand)
    torch.testing.assert_close(out.aux_losses["kl"], 0.1 * kl_to_geometric(out.log_halt_probs, 0.3))
    (parts["loss"] + out.aux_losses["kl"]).backward()
    assert model.body.halt.weight.grad.abs().sum() > 0  # the halting unit learns from both terms
    # The train-mode logits are the mixture over halting steps.
    mix = (p.unsqueeze(2) * out.step_logits.softmax(2)).sum(1).log()
    torch.testing.assert_close(out.logits, mix, rtol=1e-5, atol=1e-6)


def test_threshold_rule_halts_at_the_quantile_and_is_monotone():
    model = _model().eval()
    x = torch.randn(200, 7)
    means = []
    for q in (0.2, 0.5, 0.8):
        model.threshold = q
        with torch.inference_mode():
            sim = model(x, mode="simulate")
            logp = model(x, mode="train").log_halt_probs
        cdf = logp.exp().cumsum(1)
        expected = (cdf < q - 1e-6).sum(1).clamp(max=5) + 1  # first n with P(n* <= n) >= q
        assert torch.equal(sim.decisions["steps"], expected)
        means.append(float(sim.decisions["steps"].double().mean()))
    assert means[0] <= means[1] <= means[2] and means[0] < means[2]


def test_sampled_halting_agrees_between_modes_and_follows_lambda():
    model = _model(halting="sample", sample_seed=7).eval()
    x = torch.randn(4000, 7)
    with torch.inference_mode():
        sim = model(x, mode="simulate")
        exe = model(x, mode="execute")
        again = model(x, mode="execute")
        lam1 = torch.sigmoid(model.body.halting(model.body.step(x, torch.zeros(4000, 16), first=True)))
    assert torch.equal(sim.decisions["steps"], exe.decisions["steps"])
    assert torch.equal(exe.decisions["steps"], again.decisions["steps"])
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-4, atol=1e-4)
    # P(n* = 1) = E[lambda_1]: 4000 draws, ~4 standard errors.
    assert abs(float((exe.decisions["steps"] == 1).double().mean()) - float(lam1.mean())) < 0.03


def test_execute_compacts_rows_and_reads_out_each_sample_once():
    model = _model(max_steps=8).eval()
    rows, heads = [], []
    h1 = model.body.cell.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    h2 = model.body.head.register_forward_hook(lambda m, i, o: heads.append(i[0].shape[0]))
    with torch.inference_mode():
        out = model(torch.randn(64, 7), mode="execute")
    h1.remove()
    h2.remove()
    steps = out.decisions["steps"]
    assert rows == [int((steps >= n).sum()) for n in range(1, int(steps.max()) + 1)]
    assert sum(heads) == 64 and sum(rows) < 64 * 8


def test_all_on_runs_every_step_without_halting_units():
    model = _model().eval()
    calls = []
    h = model.body.halt.register_forward_hook(lambda m, i, o: calls.append(1))
    with torch.inference_mode(), model.all_on():
        out = model(torch.randn(5, 7), mode="execute")
    h.remove()
    assert not calls and (out.decisions["steps"] == 6).all()
    torch.testing.assert_close(out.cost, torch.full((5,), model.full_cost(), dtype=torch.float64))


def test_calibrate_threshold_to_a_step_budget():
    model = _model(max_steps=10, halting="sample").eval()
    x = torch.randn(300, 7)
    cal = calibrate_pondernet_threshold(model, x, budget=3.0, unit="steps")
    assert model.halting == "threshold" and model.threshold == cal.knob
    assert abs(cal.mean_cost - 3.0) < 0.3
    with pytest.raises(ValueError, match="out of range"):
        calibrate_pondernet_threshold(model, x, budget=0.5, unit="steps")


def test_sequence_bodies_are_rejected():
    body = RecurrentBody(input_size=3, seq_len=4, hidden_size=5, num_classes=2)
    with pytest.raises(ValueError, match="one input"):
        PonderNet(body)
