"""LSTM-Jump, early-stop reading and Skim-RNN: reading rules, losses, costs, knobs and pictures."""

import torch

import dynaneural as dn
from dynaneural.temporal_wise.sequence.visualize import plot_timelines, timeline_codes


def _x(model, n=16, seed=0):
    return model.example_input(n, generator=torch.Generator().manual_seed(seed))


def test_jump_reads_runs_of_r_tokens_then_jumps_at_most_k():
    model = dn.create_model("test_lstm_jump").eval()
    cfg = model.config
    x = _x(model, 32)
    with torch.inference_mode():
        out = model(x, mode="execute")
    read = out.decisions["read"]
    assert read[:, 0].all()
    assert (~read).any(), "some tokens must be jumped over or left unread"
    for b in range(x.shape[0]):
        pos = read[b].nonzero().squeeze(1).tolist()
        gaps = [q - p - 1 for p, q in zip(pos, pos[1:], strict=False)]
        runs, run = [], 1
        for g in gaps:
            assert 0 <= g <= cfg.max_jump
            if g == 0:
                run += 1
            else:
                runs.append(run)
                run = 1
        assert all(r % cfg.read == 0 for r in runs)  # a jump only ever follows R reads
        assert int(out.decisions["jumps"][b]) == sum(g > 0 for g in gaps) <= cfg.max_jumps


def test_jump_reinforce_trains_the_policy():
    model = dn.create_model("test_lstm_jump").train()
    x = _x(model)
    out = model(x, mode="train")
    assert out.policy_log_prob is not None and out.policy_log_prob.requires_grad
    parts = model.loss(out, torch.zeros(x.shape[0], dtype=torch.long))
    parts["loss"].backward()
    assert model.policy.weight.grad.abs().sum() > 0


def test_jump_cost_matches_tokens_read():
    model = dn.create_model("test_lstm_jump").eval()
    with torch.inference_mode():
        out = model(_x(model), mode="execute")
    bb = model.backbone
    cell = out.decisions["read"].sum(1).double() * bb.step_flops
    torch.testing.assert_close(out.cost_by_part["cell"], cell, rtol=0, atol=0)
    assert (out.cost < bb.step_flops * model.input_shape[0] + bb.head_flops + 1e9).all()


def test_early_stop_threshold_extremes():
    model = dn.create_model("test_early_stop_lstm").eval()
    x = _x(model)
    steps = x.shape[1]
    chunk = model.config.chunk
    lengths = (x != 0).sum(1)  # right-padded texts of random lengths
    assert lengths.min() < steps
    model.set_threshold(2.0)  # never confident enough: each sample reads its whole text, and no further
    with torch.inference_mode():
        full = model(x, mode="execute")
    assert full.decisions["read"].sum(1).tolist() == lengths.tolist()
    assert full.decisions["read_fraction"].tolist() == [1.0] * x.shape[0]
    bb = model.backbone
    chunks = (lengths + chunk - 1) // chunk  # one classifier evaluation per chunk read
    torch.testing.assert_close(full.cost, (lengths * bb.step_flops + chunks * bb.head_flops).double())
    model.set_threshold(0.0)  # always confident: stop after the first chunk
    with torch.inference_mode():
        first = model(x, mode="execute")
    first_read = lengths.clamp(max=chunk)
    assert first.decisions["read"].sum(1).tolist() == first_read.tolist()
    torch.testing.assert_close(first.cost, (first_read * bb.step_flops + bb.head_flops).double())


def test_early_stop_answers_at_the_end_of_each_text_whatever_the_batch_padding():
    import pytest

    model = dn.create_model("test_early_stop_lstm").eval()
    model.set_threshold(0.9)
    x = _x(model)
    lengths = (x != 0).sum(1)
    with torch.inference_mode():
        batched = model(x, mode="execute")
        sim = model(x, mode="simulate")
        for i in range(x.shape[0]):  # each text alone, without the batch's padding
            alone = model(x[i:i + 1, : int(lengths[i])], mode="execute")
            torch.testing.assert_close(alone.logits, batched.logits[i:i + 1], rtol=1e-5, atol=1e-5)
            assert alone.cost.item() == batched.cost[i].item()
    torch.testing.assert_close(sim.logits, batched.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(sim.decisions["stop_chunk"], batched.decisions["stop_chunk"])
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:1, :-3]], 1)  # padding before the text
    left[0, 3] = 5
    with pytest.raises(ValueError, match="right-padded"):
        model(left)
    from dynaneural.temporal_wise.sequence.early_stop import EarlyStopConfig, EarlyStopReader

    lenient = EarlyStopReader(EarlyStopConfig(vocab_size=40, embed_dim=8, hidden_size=16, num_classes=3, max_len=12,
                                              chunk=4, stop_at_end=False)).eval()
    assert lenient(left, mode="execute").decisions["stop_chunk"].shape == (1,)


def test_early_stop_loss_covers_every_chunk():
    model = dn.create_model("test_early_stop_lstm").train()
    out = model(_x(model), mode="train")
    assert len(out.chunk_logits) == 3
    model.loss(out, torch.zeros(16, dtype=torch.long))["loss"].backward()
    assert model.backbone.head.weight.grad is not None


def test_early_stop_objective_options():
    import pytest
    import torch.nn.functional as F

    from dynaneural.temporal_wise.sequence.early_stop import EarlyStopConfig, EarlyStopReader

    model = dn.create_model("test_early_stop_lstm").train()
    x, y = _x(model), torch.arange(16) % 3
    out = model(x, mode="train")
    plain = torch.stack([F.cross_entropy(z, y) for z in out.chunk_logits]).mean()
    assert torch.allclose(model.loss(out, y)["loss"], plain)  # default: the mean cross-entropy over chunks
    cfg = dict(vocab_size=40, embed_dim=8, hidden_size=16, num_classes=3, max_len=12, chunk=4)
    lin = EarlyStopReader(EarlyStopConfig(**cfg, exit_weights="linear"))
    lin.load_state_dict(model.state_dict())
    ce = [F.cross_entropy(z, y) for z in out.chunk_logits]
    assert torch.allclose(lin.loss(out, y)["loss"], (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6)
    sd = EarlyStopReader(EarlyStopConfig(**cfg, distill_alpha=0.5))
    parts = sd.loss(out, y)
    assert parts["distill"] > 0 and not torch.allclose(parts["loss"], plain)
    with pytest.raises(ValueError, match="exit_weights"):
        EarlyStopConfig(exit_weights="quadratic")


def test_skim_leaves_the_big_units_untouched():
    model = dn.create_model("test_skim_lstm").eval()
    x = _x(model)
    model.set_threshold(0.0)  # always skim
    captured = {}
    model.backbone.head.register_forward_hook(lambda m, i, o: captured.setdefault("h", i[0]))
    with torch.inference_mode():
        out = model(x, mode="execute")
    d = model.config.small_size
    assert not out.decisions["updates"].any()
    assert torch.equal(captured["h"][:, d:], torch.zeros_like(captured["h"][:, d:]))
    steps = x.shape[1]
    want = steps * (model.small_flops + model.policy_flops) + model.backbone.head_flops
    assert out.cost.tolist() == [float(want)] * x.shape[0]


def test_skim_gumbel_training_and_budget():
    model = dn.create_model("test_skim_lstm").train()
    model.set_train_progress(0.5)
    out = model(_x(model), mode="train")
    (out.logits.sum() + out.aux_losses["budget"]).backward()
    assert model.policy.weight.grad.abs().sum() > 0


def test_timeline_pictures(tmp_path):
    for name in ("test_skip_lstm", "test_lstm_jump", "test_early_stop_lstm", "test_skim_lstm"):
        model = dn.create_model(name).eval()
        x = _x(model, 6)
        with torch.inference_mode():
            out = model(x, mode="execute")
        codes = timeline_codes(out, x, skip_code=5 if name == "test_skim_lstm" else 2)
        assert codes.shape == x.shape[:2]
        tokens = [[f"w{int(t)}" for t in row] for row in x] if not x.is_floating_point() else None
        path = plot_timelines(codes, tmp_path / f"{name}.png", tokens=tokens, title=name)
        assert path.stat().st_size > 1000
    jump = dn.create_model("test_lstm_jump").eval()
    with torch.inference_mode():
        codes = timeline_codes(jump(_x(jump, 32), mode="execute"))
    assert (codes == 3).any() or (codes == 4).any()
