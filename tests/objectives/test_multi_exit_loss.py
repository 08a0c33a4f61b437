"""MultiExitLoss: values against hand-computed references, gradient flow, and input validation."""

import math

import pytest
import torch
import torch.nn.functional as F

import dynaneural as dn
from dynaneural.engine import TrainConfig
from dynaneural.objectives import MultiExitLoss, exit_weights


def _logits(k=3, b=6, c=5, *, grad=True):
    return [torch.randn(b, c, requires_grad=grad) for _ in range(k)]


def test_uniform_weights_is_mean_of_exit_cross_entropies():
    z, y = _logits(), torch.randint(0, 5, (6,))
    parts = MultiExitLoss()(z, y)
    ce = [F.cross_entropy(t, y) for t in z]
    torch.testing.assert_close(parts["loss"], sum(ce) / 3)
    for k in range(3):
        torch.testing.assert_close(parts[f"ce/exit{k}"], ce[k].detach())
    assert parts["distill"] == 0 and parts["policy"] == 0


def test_linear_and_explicit_weights_are_normalised():
    z, y = _logits(), torch.randint(0, 5, (6,))
    ce = [F.cross_entropy(t, y) for t in z]
    torch.testing.assert_close(MultiExitLoss(weights="linear")(z, y)["loss"], (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6)
    torch.testing.assert_close(MultiExitLoss(weights=[2, 2, 2])(z, y)["loss"], MultiExitLoss()(z, y)["loss"])
    torch.testing.assert_close(MultiExitLoss(weights=[0, 0, 1])(z, y)["loss"], ce[2])
    torch.testing.assert_close(exit_weights("linear", 4), torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_unnormalised_weights_sum_the_exit_losses():
    """normalise=False (slimmable networks' objective): uniform is the plain sum, explicit weights apply as given."""
    z, y = _logits(), torch.randint(0, 5, (6,))
    ce = [F.cross_entropy(t, y) for t in z]
    torch.testing.assert_close(MultiExitLoss(normalise=False)(z, y)["loss"], sum(ce))
    torch.testing.assert_close(MultiExitLoss(weights=[2, 0, 1], normalise=False)(z, y)["loss"], 2 * ce[0] + ce[2])
    torch.testing.assert_close(exit_weights("linear", 3, normalise=False), torch.tensor([1.0, 2.0, 3.0]))
    # distillation keeps its per-exit form; only the weighting changes
    a = MultiExitLoss(distill_alpha=0.5, normalise=False)(z, y)["loss"]
    torch.testing.assert_close(a, 3 * MultiExitLoss(distill_alpha=0.5)(z, y)["loss"])
    with pytest.raises(ValueError, match="normalise must be a bool"):
        MultiExitLoss(normalise="no")


def test_train_config_passes_normalise_to_the_loss():
    cfg = TrainConfig(normalise_exit_weights=False, device="cpu")
    assert cfg.loss().normalise is False and cfg.to_dict()["normalise_exit_weights"] is False
    assert TrainConfig.from_dict(cfg.to_dict()).loss() == cfg.loss()


def test_single_exit_or_plain_logits_is_cross_entropy():
    z, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    loss = MultiExitLoss(weights="linear", distill_alpha=0.5, label_smoothing=0.1)
    torch.testing.assert_close(loss(z, y)["loss"], F.cross_entropy(z, y, label_smoothing=0.1))


def test_distillation_is_zero_when_all_exits_agree():
    z0 = torch.randn(6, 5)
    z = [z0.clone().requires_grad_() for _ in range(3)]
    y = torch.randint(0, 5, (6,))
    parts = MultiExitLoss(distill_alpha=0.7, distill_temperature=4.0)(z, y)
    assert parts["distill"].item() == 0.0
    parts["loss"].backward()
    assert all(torch.isfinite(t.grad).all() for t in z)


def test_distillation_value_and_teacher_is_detached():
    z, y = _logits(k=2), torch.randint(0, 5, (6,))
    alpha, t = 0.4, 2.0
    parts = MultiExitLoss(distill_alpha=alpha, distill_temperature=t)(z, y)
    p_teacher = (z[1].detach() / t).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (z[0] / t).log_softmax(-1))).sum(-1).mean() * t * t
    expected = 0.5 * ((1 - alpha) * F.cross_entropy(z[0], y) + alpha * kl) + 0.5 * F.cross_entropy(z[1], y)
    torch.testing.assert_close(parts["loss"], expected)
    torch.testing.assert_close(parts["distill"], kl.detach())
    assert parts["distill"] > 0
    # The last exit's gradient comes from its own cross-entropy only: the teacher is not pulled toward students.
    (g_last,) = torch.autograd.grad(parts["loss"], z[1])
    (g_ce,) = torch.autograd.grad(0.5 * F.cross_entropy(z[1], y), z[1])
    torch.testing.assert_close(g_last, g_ce)


def test_policy_bce_targets_exit_correctness():
    y = torch.tensor([0, 1, 2, 0])
    right = F.one_hot(y, 3).float() * 5  # argmax == label everywhere
    wrong = F.one_hot((y + 1) % 3, 3).float() * 5  # argmax != label everywhere
    pol = [torch.zeros(4, requires_grad=True), torch.full((4,), 2.0, requires_grad=True)]
    out = dn.EarlyExitOutput(logits=right, cost=torch.zeros(4), decisions={}, mode=dn.Mode.TRAIN,
                             exit_logits=[right, wrong, right], policy_logits=pol)
    parts = MultiExitLoss(policy_weight=0.5)(out, y)
    expected = (F.binary_cross_entropy_with_logits(pol[0], torch.ones(4))
                + F.binary_cross_entropy_with_logits(pol[1], torch.zeros(4))) / 2
    torch.testing.assert_close(parts["policy"], expected.detach())
    assert [int(parts[f"correct/exit{k}"]) for k in range(3)] == [4, 0, 4]
    parts["loss"].backward()
    assert pol[0].grad is not None and (pol[0].grad < 0).all()  # pushed toward "exit"
    assert (pol[1].grad > 0).all()  # pushed toward "continue"


def test_gradients_reach_every_parameter_of_a_model_with_learned_policy():
    model = dn.create_model("test_exit_convnet", exit_policy=True)
    out = model(torch.randn(8, 1, 8, 8))
    parts = MultiExitLoss(distill_alpha=0.5, weights="linear")(out, torch.randint(0, 10, (8,)))
    assert torch.isfinite(parts["loss"]) and parts["loss"].requires_grad
    assert all(not v.requires_grad for k, v in parts.items() if k != "loss")
    parts["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_label_validation():
    z = _logits(k=2, b=4, c=3)
    loss = MultiExitLoss()
    with pytest.raises(TypeError, match="integer class indices"):
        loss(z, torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        loss(z, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        loss(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        loss(z, [0, 1, 2, 0])
    assert loss(z, torch.tensor([0, 1, 2, 0], dtype=torch.int32))["loss"].isfinite()


def test_output_and_config_validation():
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="2 exit weights for a model with 3 exits"):
        MultiExitLoss(weights=[1, 2])(_logits(b=4), y)
    with pytest.raises(ValueError, match="same shape"):
        MultiExitLoss()([torch.randn(4, 3), torch.randn(4, 5)], y)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        MultiExitLoss()([torch.randn(4)], y)
    with pytest.raises(TypeError, match="cannot read logits"):
        MultiExitLoss()(object(), y)
    out = dn.EarlyExitOutput(logits=torch.randn(4, 3), cost=torch.zeros(4), decisions={}, mode=dn.Mode.TRAIN,
                             exit_logits=_logits(b=4, c=3), policy_logits=[torch.randn(4)])
    with pytest.raises(ValueError, match="one policy logit tensor per intermediate exit"):
        MultiExitLoss()(out, y)
    for bad in (dict(weights="cubic"), dict(weights=[1, -1]), dict(weights=[0, 0]), dict(distill_alpha=1.5),
                dict(distill_temperature=0), dict(policy_weight=-1), dict(label_smoothing=1.0),
                dict(weights=[math.nan])):
        with pytest.raises(ValueError):
            MultiExitLoss(**bad)
    with pytest.raises(TypeError):
        MultiExitLoss("uniform")  # keyword-only


def test_config_round_trip():
    for loss in (MultiExitLoss(weights=[1, 2], distill_alpha=0.3), MultiExitLoss(normalise=False)):
        assert MultiExitLoss(**loss.config()) == loss
