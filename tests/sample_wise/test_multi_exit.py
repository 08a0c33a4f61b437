"""Focused checks of the generic multi-exit network: learned exit policy, anytime deadlines, ledger by part."""

import math

import pytest
import torch

import dynaneural as dn
from dynaneural.calibration import calibrate_exits, collect_exit_statistics
from dynaneural.engine import TrainConfig, train


def test_learned_exit_policy_trains_and_executes_like_simulate():
    torch.manual_seed(0)
    model = dn.create_model("test_exit_convnet", exit_policy=True)
    x = torch.randn(256, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()  # learnable: sign of the mean pixel
    train(model, train_x=x, train_y=y, config=TrainConfig(epochs=3, batch_size=64, progress=False, device="cpu"))
    model.eval()
    out = model(x, mode="train")
    assert out.policy_logits is not None and len(out.policy_logits) == model.num_exits - 1
    res = calibrate_exits(model, x, y, budget=0.7, unit="fraction", rule="learned")
    with torch.inference_mode():
        sim = model(x, mode="simulate")
        exe = model(x, mode="execute")
    assert res.achieved == pytest.approx(0.7, rel=0.03)
    torch.testing.assert_close(exe.exit_index, sim.exit_index)
    torch.testing.assert_close(exe.cost, sim.cost, rtol=0, atol=0)
    # the policy heads are charged: a learned-rule path costs more than the same exit under a free rule
    profile = model.cost_profile()
    assert all(p > 0 for p in profile.policy[:-1])


def test_anytime_deadline_takes_the_deepest_affordable_exit():
    model = dn.create_model("test_exit_convnet").eval()
    profile = model.cost_profile()
    path = profile.path_costs([True] * model.num_exits)
    x = torch.randn(10, 1, 8, 8)
    with torch.inference_mode():
        for k in range(model.num_exits):
            out = model(x, mode="execute", thresholds=[math.inf] * model.num_exits, max_flops=float(path[k]) + 0.5)
            sim = model(x, mode="simulate", thresholds=[math.inf] * model.num_exits, max_flops=float(path[k]) + 0.5)
            assert (out.exit_index == k).all() and (sim.exit_index == k).all()
            assert (out.cost <= float(path[k]) + 0.5).all()
            torch.testing.assert_close(out.logits, sim.logits)


def test_wall_clock_deadline_stops_early():
    model = dn.create_model("test_exit_convnet").eval()
    with torch.inference_mode():
        out = model(torch.randn(4, 1, 8, 8), mode="execute", max_seconds=1e-9)
    assert (out.exit_index == 0).all()  # the deadline had passed by the first exit
    with pytest.raises(ValueError, match="execute mode"):
        model(torch.randn(4, 1, 8, 8), mode="simulate", max_seconds=1.0)


def test_ledger_by_part_adds_up_and_skipped_stages_cost_nothing():
    model = dn.create_model("test_exit_convnet").eval()
    x = torch.randn(32, 1, 8, 8)
    stats = collect_exit_statistics(model, x, torch.zeros(32, dtype=torch.long))
    thr = [float(stats.scores[:, 0].median()), math.inf, -math.inf]
    with torch.inference_mode():
        out = model(x, mode="execute", thresholds=thr, track_parts=True)
    total = sum(out.cost_by_part.values())
    torch.testing.assert_close(total, out.cost)
    left_early = out.exit_index == 0
    assert left_early.any() and (~left_early).any()
    assert (out.cost_by_part["stage2"][left_early] == 0).all()
    assert "exit1" not in out.cost_by_part  # a disabled exit's classifier never runs


def test_execute_never_runs_later_stages_for_exited_samples():
    """Real skipping: count the rows each stage actually receives."""
    model = dn.create_model("test_exit_convnet").eval()
    seen = []
    hooks = [s.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for s in model.stages]
    x = torch.randn(40, 1, 8, 8)
    stats = collect_exit_statistics(model, x, torch.zeros(40, dtype=torch.long))
    seen.clear()
    thr = [float(stats.scores[:, 0].quantile(0.5)), float(stats.scores[:, 1].quantile(0.5)), -math.inf]
    with torch.inference_mode():
        out = model(x, mode="execute", thresholds=thr)
    for h in hooks:
        h.remove()
    counts = torch.bincount(out.exit_index, minlength=3)
    assert seen == [40, 40 - int(counts[0]), 40 - int(counts[0]) - int(counts[1])]
    assert seen[-1] < 40


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_reached_scores_agree_between_simulate_and_execute(rule):
    """The label-free feedback the budget controller reads: the same scores, exit by exit, in both modes."""
    model = dn.create_model("test_exit_convnet").eval()
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = collect_exit_statistics(model, x, torch.zeros(300, dtype=torch.long), rule=rule)
    mid = stats.scores[:, :-1].nanquantile(0.5, dim=0).tolist()
    thr = [*mid, float("-inf")]
    with torch.inference_mode():
        sim = model(x, mode="simulate", rule=rule, thresholds=thr)
        exe = model(x, mode="execute", rule=rule, thresholds=thr)
    assert sim.reached_scores is not None and exe.reached_scores is not None
    assert exe.reached_scores[-1] is None and sim.reached_scores[-1] is None
    for k in range(model.num_exits - 1):
        reached = int((sim.exit_index >= k).sum())
        assert exe.reached_scores[k].numel() == reached
        torch.testing.assert_close(exe.reached_scores[k].sort().values, sim.reached_scores[k].sort().values)
