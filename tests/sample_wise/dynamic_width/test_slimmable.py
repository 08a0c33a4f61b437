"""Slimmable per-sample width: grouping rows by width, sliced execution, FLOPs, calibration, training outputs."""

import pytest
import torch

import dynaneural as dn
from dynaneural.compute.flops import static_flops
from dynaneural.execution import group_rows
from dynaneural.sample_wise.dynamic_width.slimmable import calibrate_width


def _model(threshold=0.5):
    torch.manual_seed(0)
    return dn.create_model("test_slimmable", threshold=threshold).eval()


def test_each_width_level_equals_its_static_slice_and_cost():
    m = _model()
    x = m.example_input(6)
    with torch.inference_mode():
        for lv in range(m.num_levels):
            static = m.to_static(lv).eval()
            torch.testing.assert_close(m.run_level(x, lv, folded=True), static(x), rtol=1e-4, atol=1e-4)
            assert m.level_cost[lv] == static_flops(static, x[:1])


def _spy_run_level(m):
    """Record (level, rows) of every ``run_level`` call from now on; returns the list it fills."""
    calls = []
    orig = m.run_level

    def spy(sub, lv, *, folded=False):
        calls.append((lv, sub.shape[0]))
        return orig(sub, lv, folded=folded)

    m.run_level = spy
    return calls


def test_execute_groups_rows_by_width():
    m = _model()
    x = m.example_input(64, generator=torch.Generator().manual_seed(3))
    calls = _spy_run_level(m)
    with torch.inference_mode():
        out = m(x, mode="execute")
    counts = torch.bincount(out.width, minlength=m.num_levels)
    assert len({lv for lv, _ in calls}) == len(calls)  # one sub-batch per width level
    assert sorted(calls) == [(lv, int(c)) for lv, c in enumerate(counts) if c > 0]
    assert len(calls) > 1
    expected = torch.tensor(m.level_cost, dtype=torch.float64)[out.width] + m.policy_cost
    torch.testing.assert_close(out.cost, expected, rtol=0, atol=0)


def test_group_rows_partitions_the_batch():
    keys = torch.tensor([2, 0, 2, 1, 0, 3])
    groups = group_rows(keys, 4)
    assert [g.tolist() for g in groups] == [[1, 4], [3], [0, 2], [5]]


def test_threshold_moves_cost_monotonically_and_calibrates():
    m = _model()
    x = m.example_input(128, generator=torch.Generator().manual_seed(1))
    costs = []
    with torch.inference_mode():
        for t in (0.0, 0.5, 1.0):
            m.set_threshold(t)
            costs.append(float(m(x, mode="execute").cost.mean()))
    assert costs[0] <= costs[1] <= costs[2]
    assert costs[0] == pytest.approx(m.level_cost[0] + m.policy_cost)
    m.set_threshold(0.5)
    lo, hi = costs[0] / (m.level_cost[-1] + m.policy_cost), costs[2] / (m.level_cost[-1] + m.policy_cost)
    target = 0.5 * (lo + hi)
    cal = calibrate_width(m, x, budget=target)
    assert abs(cal.mean_cost - target) < 0.2 * target
    with pytest.raises(ValueError):
        calibrate_width(m, x, budget=1.5)


def test_train_mode_returns_every_width_and_policy_loss():
    m = _model().train()
    out = m(m.example_input(8), mode="train")
    assert len(out.exit_logits) == m.num_levels and "width_policy" in out.aux_losses
    loss = sum(z.logsumexp(-1).mean() for z in out.exit_logits) + out.aux_losses["width_policy"]
    loss.backward()
    assert m.policy[-1].weight.grad is not None and m.layers[0].bns[0].weight.grad is not None


def test_trainer_trains_all_widths_with_multi_exit_loss():
    from dynaneural.engine import TrainConfig, train

    m = _model()
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    res = train(m, train_x=x, train_y=y, val_x=x, val_y=y,
                config=TrainConfig(epochs=1, batch_size=32, lr=0.05, progress=False, device="cpu",
                                   distill_alpha=0.5))
    assert any(k.startswith("val_acc/exit") for k in res.history[-1])


# ---------------------------------------------------------------------------------------------- confidence cascade
def _cascade(threshold=0.15):
    return dn.create_model("test_slimmable_cascade", threshold=threshold, seed=0).eval()


def test_cascade_runs_each_rung_on_the_undecided_rows_only_and_charges_what_ran():
    m = _cascade()
    x = m.example_input(64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        rungs = torch.stack([m.run_level(x, lv) for lv in m.ladder], 1)
        m.set_threshold(float(rungs[:, 0].softmax(-1).amax(-1).quantile(0.4)))  # ~60 % stop at the first rung
        stops = m.cascade_stops(rungs)
        calls = _spy_run_level(m)
        out = m(x, mode="execute")
    # rung i runs on exactly the samples that did not stop before it
    expected = [(lv, int((stops >= i).sum())) for i, lv in enumerate(m.ladder) if (stops >= i).any()]
    assert calls == expected and calls[0] == (0, 64) and 0 < calls[1][1] < 64
    torch.testing.assert_close(out.width, torch.tensor(m.ladder)[stops])
    paid = torch.tensor(m.ladder_cost, dtype=torch.float64)[stops]
    torch.testing.assert_close(out.cost, paid, rtol=0, atol=0)
    assert m.ladder_cost == [m.level_cost[0], m.level_cost[0] + m.level_cost[1], sum(m.level_cost[lv] for lv in m.ladder)]
    # a sample's answer is the logits of the rung it stopped at
    for i in range(64):
        torch.testing.assert_close(out.logits[i], rungs[i, stops[i]], rtol=1e-4, atol=1e-4)


def test_cascade_threshold_extremes_and_calibration():
    m = _cascade()
    x = m.example_input(128, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        m.set_threshold(0.0)
        low = m(x, mode="execute")
        m.set_threshold(1.0)
        high = m(x, mode="execute")
    assert (low.width == m.ladder[0]).all() and (low.cost == m.level_cost[m.ladder[0]]).all()
    assert (high.width == m.ladder[-1]).all() and (high.cost == m.ladder_cost[-1]).all()
    full = m.level_cost[-1]
    target = 0.5 * (m.level_cost[m.ladder[0]] + m.ladder_cost[-1]) / full
    cal = calibrate_width(m, x, budget=target)
    with torch.inference_mode():
        achieved = float(m(x, mode="execute").cost.mean()) / full
    assert achieved == pytest.approx(cal.mean_cost, rel=1e-9)
    assert abs(achieved - target) < 0.05 * target  # 128 samples: the cost moves in steps of one sample's rung
    with pytest.raises(ValueError):
        calibrate_width(m, x, budget=0.9 * m.level_cost[m.ladder[0]] / full)  # below the first rung alone


def test_to_cascade_is_the_same_cascade_as_a_multi_exit_network_and_streams():
    """The exported model cascade takes the same decisions, logits and per-sample cost (one batch and streamed),
    and folding its batch norms changes the logits only by rounding."""
    m = _cascade()
    x = m.example_input(96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        first = m.run_level(x, m.ladder[0]).softmax(-1).amax(-1).sort().values
        # Thresholds half-way between two samples' first-rung scores, below all of them and above all of them.
        # Not a threshold equal to a score: execute mode runs the widths with folded batch norms and the exported
        # cascade unfolded, so a sample exactly at the threshold may fall either way by one rounding.
        # Near each of four ranks, the widest gap between neighbouring scores, so the rounding cannot cross it.
        gaps = first[1:] - first[:-1]
        ks = [lo + int(gaps[lo:lo + 8].argmax()) for lo in (0, 24, 62, 87)]
        assert all(gaps[k] > 1e-5 for k in ks)
        mids = [float(first[k] + first[k + 1]) / 2 for k in ks]
        for t in (0.0, *mids, 1.0):
            m.set_threshold(t)
            c = m.to_cascade()
            assert not c.training and c.num_exits == len(m.ladder)
            ref = m(x, mode="execute")
            for out in (c(x, mode="execute"), c(x, mode="execute", slots=16), c(x, mode="simulate")):
                torch.testing.assert_close(torch.tensor(m.ladder)[out.exit_index], ref.width, rtol=0, atol=0)
                torch.testing.assert_close(out.cost, ref.cost, rtol=1e-9, atol=0)
                torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        folded = dn.layers.fold_batch_norms(c)
        out = folded(x, mode="execute", slots=16)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        assert (out.cost < ref.cost).all()  # the folded network runs no batch norm and is charged none
    assert m.train().to_cascade().training  # follows the source model's mode


def test_chooser_switch_and_bad_ladders_fail_loudly():
    m = _model()
    x = m.example_input(16)
    m.set_chooser("cascade", cascade_levels=[1, 3])
    assert m.ladder == (1, 3)
    with torch.inference_mode():
        out = m(x, mode="execute")
    assert set(out.width.tolist()) <= {1, 3} and out.width_logits is None  # the policy did not run
    m.set_chooser("policy")
    with torch.inference_mode():
        assert m(x, mode="execute").width_logits is not None
    for bad in ([1, 2], [3, 1], [], [1, 1, 3], [-1, 3]):
        with pytest.raises(ValueError, match="cascade_levels"):
            m.set_chooser("cascade", cascade_levels=bad)
    with pytest.raises(ValueError, match="chooser"):
        m.set_chooser("oracle")
    assert m.chooser == "policy"  # a refused switch changes nothing
    with pytest.raises(ValueError, match="cascade_levels"):
        dn.create_model("test_slimmable_cascade", cascade_levels=(0, 1))
