"""Early exit over frames: decisions, savings, calibration, compaction and the per-step loss."""

import pytest
import torch

import dynaneural as dn
from dynaneural.compute.flops import static_flops
from dynaneural.temporal_wise.video.frame_exit import RecurrentExitNetwork, first_exit_step


def _model(**kw):
    return dn.create_model("test_frame_exit", **kw).eval()


def test_first_exit_step_respects_min_steps_and_last():
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.95, 0.2, 0.1]])
    assert first_exit_step(scores, 0.8).tolist() == [0, 3, 1]
    assert first_exit_step(scores, 0.8, min_steps=3).tolist() == [3, 3, 3]


def test_exit_thresholds_move_cost_monotonically():
    m = _model()
    x = m.example_input(64, generator=torch.Generator().manual_seed(3))
    costs = []
    with torch.inference_mode():
        for thr in (float("-inf"), 0.4, 0.6, 2.0, float("inf")):
            m.exit_threshold.fill_(thr)
            costs.append(float(m(x, mode="execute").cost.mean()))
    assert costs[:4] == sorted(costs[:4]) and costs[0] < costs[3]
    # Exits enabled but never taken cost the classifier after every step; disabled exits cost the static twin.
    assert costs[3] == pytest.approx(float(m.path_costs()[-1])) and costs[4] == pytest.approx(m.static_cost)


def test_exited_samples_stop_being_encoded():
    """Execute mode encodes only the frames of the samples still reading: count encoder rows with a hook."""
    m = _model(exit_threshold=float("-inf"))  # everyone exits after the first frame
    m.piece_flops()  # counted once with a probe batch; not part of the forward
    rows = []
    h = m.encoder.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    with torch.inference_mode():
        out = m(m.example_input(16), mode="execute")
    h.remove()
    assert rows == [16] and out.decisions["exit_step"].eq(0).all()
    assert out.decisions["frames"].sum(1).eq(1).all()


def test_mixed_exits_shrink_the_batch():
    m = _model()
    x = m.example_input(32, generator=torch.Generator().manual_seed(0))
    rows = []
    h = m.encoder.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    with torch.inference_mode():
        out = m(x, mode="execute")
    h.remove()
    steps = out.decisions["exit_step"]
    expected = [int((steps >= t).sum()) for t in range(m.num_steps) if int((steps >= t).sum())]
    assert rows == expected and rows[0] == 32 and rows[-1] < 32
    # Cost: the ledger charged each sample for exactly the steps it read.
    torch.testing.assert_close(out.cost, m.path_costs()[steps], rtol=1e-12, atol=0)


def test_calibration_meets_budget():
    m = _model()
    x = m.example_input(128, generator=torch.Generator().manual_seed(5))
    cal = m.calibrate(x, budget=0.7)
    with torch.inference_mode():
        frac = float(m(x, mode="execute").cost.mean()) / m.static_cost
    assert abs(frac - 0.7) < 0.05, cal
    with pytest.raises(ValueError, match="out of range"):
        m.calibrate(x, budget=0.01)


def test_training_loss_uses_every_step_and_backpropagates():
    m = _model().train()
    x = m.example_input(8)
    out = m(x, mode="train")
    assert out.step_logits.shape == (8, m.num_steps, 3)
    loss = m.training_loss(out, torch.randint(0, 3, (8,)))["loss"]
    loss.backward()
    assert m.encoder.features[0][0].weight.grad.abs().sum() > 0


def test_static_twin_uses_fused_lstm_and_matches_flops():
    m = _model()
    static = m.to_static()
    x = m.example_input(2)
    assert isinstance(static.memory.lstm, torch.nn.LSTM)
    assert static_flops(static, x[:1]) == pytest.approx(m.static_cost)


def test_patience_rule_state_is_compacted():
    m = dn.create_model("test_frame_exit", exit_rule="patience", exit_threshold=2.5).eval()
    x = m.example_input(32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        sim, exe = m(x, mode="simulate"), m(x, mode="execute")
    torch.testing.assert_close(exe.decisions["exit_step"], sim.decisions["exit_step"])
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-4, atol=1e-4)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="chunk"):
        RecurrentExitNetwork(encoder=torch.nn.Linear(3, 4), hidden_size=4, num_classes=2, input_shape=(5, 3),
                             chunk=2)
    with pytest.raises(ValueError, match="learned"):
        dn.create_model("test_frame_exit", exit_rule="learned", exit_threshold=0.5)


def _varied(name, exit_rule, min_steps):
    """A tiny model whose samples exit at different steps, at or after ``min_steps``."""
    m = dn.create_model(name, exit_rule=exit_rule, exit_threshold=0.5).eval()
    m.min_steps = min_steps
    with torch.no_grad():
        m.classifier.weight.mul_(8.0)
    m.calibrate(m.example_input(64, generator=torch.Generator().manual_seed(123)), budget=0.7)
    return m


@pytest.mark.parametrize("name", ["test_frame_exit", "test_audio_exit"])
@pytest.mark.parametrize(("exit_rule", "min_steps"), [("confidence", 1), ("entropy", 2), ("patience", 2)])
@pytest.mark.parametrize("slots", [1, 5, 64])
def test_streamed_execution_gives_each_sequence_its_execute_result(name, exit_rule, min_steps, slots,
                                                                  assert_stream_matches_execute):
    m = _varied(name, exit_rule, min_steps)
    x = m.example_input(40, generator=torch.Generator().manual_seed(3))
    calls = []
    with torch.inference_mode():
        ref = m(x, mode="execute")
        sim = m(x, mode="simulate")
        hook = m.encoder.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
        got = m(x, mode="execute", slots=slots)
        hook.remove()
    steps = ref.decisions["exit_step"]
    assert steps.unique().numel() > 1 and int(steps.min()) >= min_steps - 1
    assert torch.equal(sim.decisions["exit_step"], steps)
    assert_stream_matches_execute(ref, got, calls, keys=("exit_step", "frames"), slots=slots, n=40)


def test_streamed_execution_keeps_the_rows_full_and_skips_the_classifier_before_min_steps():
    m = _varied("test_audio_exit", "confidence", 2)
    x = m.example_input(40, generator=torch.Generator().manual_seed(4))
    enc, cls = [], []
    hooks = [m.encoder.register_forward_hook(lambda mod, i, o: enc.append(i[0].shape[0])),
             m.classifier.register_forward_hook(lambda mod, i, o: cls.append(i[0].shape[0]))]
    with torch.inference_mode():
        out = m(x, mode="execute", slots=8)
    for hk in hooks:
        hk.remove()
    first_short = next(i for i, n in enumerate(enc) if n < 8)
    assert all(n == 8 for n in enc[:first_short])  # full until no sequence is left to admit
    assert enc[first_short:] == sorted(enc[first_short:], reverse=True)  # then the stream drains
    # The classifier runs only on rows at or past their second step: once per such (sequence, step).
    steps = out.decisions["exit_step"]
    assert sum(cls) == int(steps.sum()) and len(cls) == len(enc) - 1


def test_streamed_execution_with_exits_disabled_reads_everything():
    m = _model()
    x = m.example_input(10, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), m.all_on():
        got, ref = m(x, mode="execute", slots=4), m.to_static()(x)
    assert got.decisions["exit_step"].eq(m.num_steps - 1).all()
    torch.testing.assert_close(got.logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.cost, torch.full_like(got.cost, m.static_cost), rtol=1e-12, atol=0)


def test_streamed_execution_rejects_bad_slots():
    m = _model()
    x = m.example_input(4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="slots"):
            m(x, mode="execute", slots=bad)
    with pytest.raises(ValueError, match="execute mode"):
        m(x, mode="simulate", slots=4)
