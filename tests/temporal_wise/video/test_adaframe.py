"""AdaFrame: frames never looked at are never encoded, rewards, REINFORCE training, calibration."""

import pytest
import torch

import dynaneural as dn
from dynaneural.temporal_wise.video.adaframe import AdaFrame, adaframe_rewards


def _model(**kw):
    return dn.create_model("test_adaframe", **kw).eval()


def test_unseen_frames_are_never_encoded():
    m = _model()
    x = m.example_input(32, generator=torch.Generator().manual_seed(0))
    seen_rows = []
    h = m.encoder.register_forward_hook(lambda mod, i, o: seen_rows.append(i[0].shape[0]))
    with torch.inference_mode():
        out = m(x, mode="execute")
    h.remove()
    frames = out.decisions["frames"]
    # One encoder call per step, on exactly the samples still looking: total rows = frames looked at.
    assert sum(seen_rows) == int(frames.sum()) < 32 * m.frames
    assert seen_rows == sorted(seen_rows, reverse=True)
    # The visiting order lists each looked-at frame once, starting from the start frame.
    order = out.decisions["frame_order"]
    assert (order[:, 0] == m.start_frame).all()
    for i in range(32):
        visited = order[i][order[i] >= 0]
        assert visited.unique().numel() == visited.numel() == int(frames[i].sum())
        assert frames[i, visited].all()


def test_frames_decision_and_cost_agree():
    m = _model()
    x = m.example_input(32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = m(x, mode="simulate")
    n = out.decisions["frames"].sum(1)
    torch.testing.assert_close(n, out.decisions["exit_step"] + 1)
    torch.testing.assert_close(out.cost, m.path_costs()[out.decisions["exit_step"]], rtol=1e-12, atol=0)


def test_confidence_stop_rule_matches_simulate():
    m = dn.create_model("test_adaframe", stop_rule="confidence", stop_threshold=0.3).eval()
    with torch.no_grad():
        m.classifier.weight.mul_(10)
    x = m.example_input(32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        sim, exe = m(x, mode="simulate"), m(x, mode="execute")
    for k in sim.decisions:
        torch.testing.assert_close(exe.decisions[k], sim.decisions[k])
    torch.testing.assert_close(exe.cost, sim.cost, rtol=1e-12, atol=0)


def test_rewards_are_improvements_of_the_margin():
    # Two classes, label 0: margins -0.2, 0.4, 0.2, 0.6 -> rewards 0, 0.6, 0, 0.2.
    p = torch.tensor([[[0.4, 0.6], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]]])
    r, g = adaframe_rewards(p.log(), torch.tensor([0]), gamma=0.5)
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.6, 0.0, 0.2]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(g, torch.tensor([[0.6 + 0.25 * 0.2, 0.0 + 0.5 * 0.2, 0.2]]), rtol=0, atol=1e-5)


def test_training_loss_trains_policy_and_utility():
    m = _model().train()
    x = m.example_input(16)
    out = m(x, mode="train")
    assert out.log_probs.shape == (16, m.max_steps - 1) == out.utilities.shape
    parts = m.training_loss(out, torch.randint(0, 3, (16,)))
    parts["loss"].backward()
    assert m.policy[-1].weight.grad is not None and m.policy[-1].weight.grad.abs().sum() > 0
    assert m.utility[-1].weight.grad is not None and m.utility[-1].weight.grad.abs().sum() > 0
    assert {"ce", "policy_loss", "utility_loss"} <= set(parts)


def test_calibrate_to_frame_budget():
    m = _model()
    x = m.example_input(128, generator=torch.Generator().manual_seed(4))
    m.calibrate(x, budget=2.0, unit="frames")
    with torch.inference_mode():
        n = m(x, mode="execute").decisions["frames"].sum(1).float().mean()
    assert abs(float(n) - 2.0) < 0.3


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_steps"):
        AdaFrame(frames=4, size=16, widths=(4,), max_steps=5)
    with pytest.raises(ValueError, match="stop_rule"):
        AdaFrame(frames=4, size=16, widths=(4,), stop_rule="entropy")  # type: ignore[arg-type]


def _varied_stops(stop_rule):
    """A tiny AdaFrame whose clips stop at different steps (threshold calibrated to 60 % of the static cost)."""
    m = _model(stop_rule=stop_rule)
    if stop_rule == "confidence":
        with torch.no_grad():
            m.classifier.weight.mul_(10)
        m.calibrate(m.example_input(64, generator=torch.Generator().manual_seed(123)), budget=0.6)
    return m


@pytest.mark.parametrize("stop_rule", ["utility", "confidence"])
@pytest.mark.parametrize("slots", [1, 5, 16, 64])
def test_streamed_execution_gives_each_clip_its_execute_result(stop_rule, slots, assert_stream_matches_execute):
    m = _varied_stops(stop_rule)
    x = m.example_input(40, generator=torch.Generator().manual_seed(3))
    calls = []
    with torch.inference_mode():
        ref = m(x, mode="execute")
        hook = m.encoder.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
        got = m(x, mode="execute", slots=slots)
        hook.remove()
    assert ref.decisions["exit_step"].unique().numel() > 1  # the clips stop at different steps
    assert_stream_matches_execute(ref, got, calls, keys=("frames", "exit_step", "frame_order"), slots=slots, n=40)


def test_streamed_execution_keeps_the_slots_full():
    m = _varied_stops("utility")
    x = m.example_input(40, generator=torch.Generator().manual_seed(4))
    calls = []
    hook = m.encoder.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
    with torch.inference_mode():
        m(x, mode="execute", slots=8)
    hook.remove()
    # A step runs on fewer than 8 clips only once no clip is left to admit: after the first short step, the
    # calls only shrink (the stream drains).
    first_short = next(i for i, n in enumerate(calls) if n < 8)
    assert all(n == 8 for n in calls[:first_short])
    assert calls[first_short:] == sorted(calls[first_short:], reverse=True)
    # Fewer steps than running the 5 batches of 8 one after the other, each until its slowest clip stops.
    batched = []
    hook = m.encoder.register_forward_hook(lambda mod, i, o: batched.append(i[0].shape[0]))
    with torch.inference_mode():
        for i in range(0, 40, 8):
            m(x[i:i + 8], mode="execute")
    hook.remove()
    assert len(calls) < len(batched) and sum(calls) == sum(batched)


def test_streamed_execution_rejects_bad_slots():
    m = _model()
    x = m.example_input(4)
    with pytest.raises(ValueError, match="slots"):
        m(x, mode="execute", slots=0)
    with pytest.raises(ValueError, match="execute mode"):
        m(x, mode="simulate", slots=4)
