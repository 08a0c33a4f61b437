"""Focused tests of the layer-skipping family (SkipNet, ConvNet-AIG, BlockDrop); the shared contract (simulate ==
execute, batched == single, all_on == static twin, bad input) is in tests/test_dynamic_contract.py."""

import pytest
import torch

import dynaneural as dn
from dynaneural.execution import Mode
from dynaneural.policies import ReinforceLoss
from dynaneural.sample_wise.layer_skip import (
    BlockDrop,
    ConvNetAIG,
    SkipNet,
    block_usage_by_class,
    blockdrop_reward,
    curriculum_free_gates,
    plot_block_usage,
    skipnet_hybrid_loss,
    train_blockdrop_policy,
)

NAMES = ["test_skipnet_ff", "test_skipnet_rnn", "test_convnet_aig", "test_blockdrop"]


def _x(model, n, seed=0):
    return model.example_input(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_execute_runs_each_block_on_exactly_the_rows_whose_gate_is_on(name):
    model = dn.create_model(name).eval()
    x = _x(model, 64)
    model.costs()  # counted once, on a one-sample example: not part of what the hooks should see
    seen: dict[int, list[int]] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, []).append(i[0].shape[0]))
             for k, b in enumerate(model.backbone.blocks)]
    try:
        with torch.inference_mode():
            out = model(x, mode="execute")
        rows_exe = {k: sum(v) for k, v in seen.items()}
        seen.clear()
        with torch.inference_mode():
            model(x, mode="simulate")
        rows_sim = {k: sum(v) for k, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    on = out.blocks.sum(0).tolist()
    assert 0 < sum(on) < out.blocks.numel(), "the tiny variant must skip some blocks and run others"
    for k in range(len(model.backbone.blocks)):
        assert rows_exe.get(k, 0) == on[k], f"block {k}: {rows_exe.get(k, 0)} rows run, {on[k]} gates on"
        assert rows_sim[k] == 64  # simulate computes every block for every sample (the reference)
    for k, gated in enumerate(model.gated):
        if not gated:
            assert on[k] == 64, "shape-changing blocks always run"


@pytest.mark.parametrize("name", NAMES)
def test_ledger_charges_blocks_run_plus_the_decision_machinery(name):
    model = dn.create_model(name).eval()
    x = _x(model, 16)
    with torch.inference_mode():
        out = model(x, mode="execute")
    c = model.costs()
    assert sum(c.gates) + c.policy > 0, "the gates / policy must be paid for"
    blocks = torch.tensor(c.net.blocks, dtype=torch.float64)
    expected = c.net.stem + c.net.head + c.policy + sum(c.gates) + out.blocks.double() @ blocks
    torch.testing.assert_close(out.cost, expected, rtol=1e-12, atol=0)
    with torch.inference_mode(), model.all_on():
        full = model(x, mode="execute")
    assert full.blocks.all()
    torch.testing.assert_close(full.cost, torch.full_like(full.cost, c.static_total), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_gradients_reach_the_decision_machinery(name):
    model = dn.create_model(name).train()
    x = _x(model, 16)
    out = model(x, mode="train")
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    if isinstance(model, BlockDrop):
        assert out.policy is not None and out.policy.actions.shape == (16, model.num_gates)
        loss = ReinforceLoss(baseline="none")(out.policy, torch.randn(16))["loss"]
    else:
        loss = torch.nn.functional.cross_entropy(out.logits, y) + sum(out.aux_losses.values())
    loss.backward()
    decision_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert decision_params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in decision_params)


def test_aig_target_rate_loss_is_the_per_gate_rate():
    model = dn.create_model("test_convnet_aig").train()
    out = model(_x(model, 32), mode="train")
    rate = out.gate_value.mean(0)
    expected = model.rate_loss.weight * ((rate - model.rate_loss.target) ** 2).mean()
    torch.testing.assert_close(out.aux_losses["target_rate"], expected)
    assert set(out.gate_value.unique().tolist()) <= {0.0, 1.0}  # straight-through: hard in the forward pass


def test_aig_temperature_follows_the_schedule():
    from dynaneural.layers.resnet import CifarResNet
    from dynaneural.policies import TemperatureSchedule

    model = ConvNetAIG(CifarResNet(input_size=8, widths=(4, 8), blocks_per_stage=2),
                       tau=TemperatureSchedule(5.0, 0.5, "exponential"))
    dn.contract.set_train_progress(model, 1.0)
    assert model.tau == pytest.approx(0.5)


def test_reinforce_step_moves_blockdrop_policy_toward_fewer_blocks():
    torch.manual_seed(0)
    model = dn.create_model("test_blockdrop").train()
    x = _x(model, 64)
    opt = torch.optim.SGD(model.policy.parameters(), lr=0.5)
    rl = ReinforceLoss(baseline="moving_average")
    with torch.no_grad():
        before = torch.sigmoid(model.policy(x)).mean()
    for _ in range(5):
        out = model(x, mode="train")
        reward = blockdrop_reward(torch.ones(64, dtype=torch.bool), out.policy.actions.sum(1), model.num_gates)
        opt.zero_grad()
        rl(out.policy, reward)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = torch.sigmoid(model.policy(x)).mean()
    assert after < before - 0.01, (before, after)


def test_curriculum_free_gates_grows_from_the_last_block_to_all():
    sched = [curriculum_free_gates(s, total_steps=14, num_gates=7) for s in range(16)]
    assert sched[0] == 1 and sched[13] == 7 and sched[14:] == [7, 7]
    assert all(b - a in (0, 1) for a, b in zip(sched, sched[1:], strict=False))  # one more block at a time
    assert [sched.count(j) for j in range(1, 7)] == [2] * 6  # even intervals
    assert curriculum_free_gates(0, total_steps=0, num_gates=7) == 7  # no curriculum


def test_blockdrop_policy_curriculum_keeps_the_early_blocks_on_and_untrained():
    """During the curriculum the policy decides only the last blocks: the others run for every sample, and their
    logits get no policy gradient (the policy's last layer keeps their weights)."""
    model = dn.create_model("test_blockdrop", seed=0)
    x = _x(model, 32)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    g = model.num_gates
    before = model.policy.fc.weight.detach().clone()
    calls = []
    orig = model.fixed_actions

    def spy(actions):
        calls.append(actions.clone())
        return orig(actions)

    model.fixed_actions = spy
    hist = train_blockdrop_policy(model, x, y, epochs=2, batch_size=16, lr=0.1, curriculum_epochs=2.0)
    # 2 steps per epoch, a ramp of 4 steps: the gates decided at the last step of each epoch
    assert [h["free_gates"] for h in hist] == [curriculum_free_gates(s, total_steps=4, num_gates=g) for s in (1, 3)]
    first = calls[0]  # the sampled actions of the first step: only the last gate is free
    assert (first[:, : g - 1] == 1).all() and (calls[1][:, : g - 1] == 1).all()  # sampled and greedy paths
    after = model.policy.fc.weight.detach()
    assert not torch.equal(after[g - 1], before[g - 1])
    # one step at the start of the ramp: only the last gate is decided, so only its row of the policy's last layer
    # moves (Adam on an exactly zero gradient leaves a weight unchanged)
    fresh = dn.create_model("test_blockdrop", seed=0)
    w0 = fresh.policy.fc.weight.detach().clone()
    train_blockdrop_policy(fresh, x, y, epochs=1, batch_size=32, lr=0.1, curriculum_epochs=1.0)
    w1 = fresh.policy.fc.weight.detach()
    assert torch.equal(w1[: g - 1], w0[: g - 1]) and not torch.equal(w1[g - 1], w0[g - 1])
    with pytest.raises(ValueError, match="curriculum_epochs"):
        train_blockdrop_policy(model, x, y, epochs=1, curriculum_epochs=2.0)


def test_reinforce_step_moves_skipnet_gates_toward_fewer_blocks():
    torch.manual_seed(0)
    model = dn.create_model("test_skipnet_rnn").train()
    model.phase = "rl"
    x = _x(model, 64)
    y = torch.zeros(64, dtype=torch.long)
    loss_fn = skipnet_hybrid_loss(model, cost_weight=50.0, reinforce=ReinforceLoss(baseline="moving_average"))
    gate_params = list(model.rnn_gate.parameters())
    opt = torch.optim.SGD(gate_params, lr=0.2)
    with torch.no_grad():
        before = model(x, mode="simulate").gate_prob.mean()
    for _ in range(5):
        out = model(x, mode="train")
        assert out.policy is not None
        opt.zero_grad()
        loss_fn(out, y)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = model(x, mode="simulate").gate_prob.mean()
    assert after < before - 0.01, (before, after)


def test_skipnet_phases():
    model = dn.create_model("test_skipnet_ff").train()
    x = _x(model, 8)
    sup = model(x, mode="train")
    assert sup.policy is None and "budget" in sup.aux_losses
    model.phase = "rl"
    rl = model(x, mode="train")
    assert rl.policy is not None and rl.policy.log_prob.shape == (8,) and "budget" not in rl.aux_losses
    with pytest.raises(ValueError, match="phase"):
        model.phase = "reinforce"


@pytest.mark.parametrize("name", NAMES)
def test_calibration_meets_budget_on_held_out_data(name):
    model = dn.create_model(name).eval()
    calib, held_out = _x(model, 600, seed=1), _x(model, 600, seed=2)
    res = model.calibrate(calib, budget=0.8, tol=2e-3)
    assert res.mean_cost == pytest.approx(0.8, rel=0.03)
    assert float(model.gate_threshold) == pytest.approx(res.knob)
    assert model.mean_cost_fraction(held_out) == pytest.approx(0.8, rel=0.05)


def test_calibration_rejects_an_unreachable_budget_and_keeps_the_threshold():
    model = dn.create_model("test_blockdrop").eval()
    before = float(model.gate_threshold)
    with pytest.raises(ValueError, match="out of range"):
        model.calibrate(_x(model, 64), budget=0.05)
    assert float(model.gate_threshold) == before


def test_block_usage_by_class_and_plot(tmp_path):
    model = dn.create_model("test_blockdrop").eval()
    x = _x(model, 200)
    y = torch.arange(200) % 7  # classes 7..9 absent
    usage = block_usage_by_class(model, x, y, batch_size=64)
    assert usage.shape == (10, len(model.backbone.blocks))
    with torch.no_grad():
        blocks = model(x, mode="execute").blocks.float()
    torch.testing.assert_close(usage[3], blocks[y == 3].mean(0))
    assert torch.isnan(usage[7:]).all()
    assert (usage[:7, [i for i, g in enumerate(model.gated) if not g]] == 1).all()
    path = plot_block_usage(usage[:7], str(tmp_path / "usage.png"))
    assert (tmp_path / "usage.png").stat().st_size > 1000 and path.endswith(".png")


def test_fold_batch_norms_recounts_costs():
    from dynaneural.layers import fold_batch_norms

    model = dn.create_model("test_skipnet_ff").eval()
    x = _x(model, 16)
    with torch.inference_mode():
        ref = model(x, mode="execute")
    folded = fold_batch_norms(model)
    with torch.inference_mode():
        out = folded(x, mode="execute")
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.blocks, ref.blocks)
    assert (out.cost < ref.cost).all()  # the folded batch norms are no longer paid for


def test_only_shape_preserving_blocks_are_gated():
    from dynaneural.layers.resnet import CifarResNet

    model = SkipNet(CifarResNet(input_size=8, widths=(4, 8, 8), blocks_per_stage=2))
    assert model.gate_blocks == (0, 1, 3, 5)  # blocks 2 and 4 halve the resolution / change the width


def test_execute_mode_with_no_block_on_and_all_blocks_on():
    model = dn.create_model("test_convnet_aig").eval()
    x = _x(model, 8)
    for t, expect in ((1.0, False), (0.0, True)):
        model.gate_threshold.fill_(t)
        with torch.inference_mode():
            exe, sim = model(x, mode=Mode.EXECUTE), model(x, mode=Mode.SIMULATE)
        gated = list(model.gate_blocks)
        assert bool(exe.blocks[:, gated].all()) == expect and bool(exe.blocks[:, gated].any()) == expect
        torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["test_skipnet_ff", "test_skipnet_rnn"])
def test_skipnet_budget_term_charges_the_blocks_its_hard_gates_run(name):
    """Gates at probability ~0.55 run every block (threshold 0.5): the budget term must see the full cost, not
    0.55 of it, or it is met while nothing is skipped (the gates then learn no input dependence)."""
    model = dn.create_model(name).train()
    model.phase = "supervised"
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.out_features == 1:  # every gate's last layer
                mod.weight.zero_()
                mod.bias.fill_(0.2)  # sigmoid(0.2) = 0.55
    x = torch.randn(6, *model.input_shape)
    out = model(x, mode="train")
    assert bool(out.decisions["blocks"].all())
    full = model.costs()
    expected_all_run = full.net.stem + full.net.head + sum(full.net.blocks) + sum(full.gates)
    torch.testing.assert_close(out.expected_cost.detach(), torch.full((6,), float(expected_all_run),
                                                                      dtype=out.expected_cost.dtype))
    out.aux_losses["budget"].backward()  # straight-through: the gates still get the budget's gradient
    grads = [m.bias.grad for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
