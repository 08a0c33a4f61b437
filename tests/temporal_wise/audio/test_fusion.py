"""Gated audio-visual fusion: a skipped modality's encoder never runs for that sample."""

import torch

import dynaneural as dn
from dynaneural.temporal_wise.audio.fusion import AUDIO, BOTH, IMAGE, make_audio_visual_pairs, pack_pair


def test_skipped_modality_encoder_never_runs():
    m = dn.create_model("test_fusion").eval()
    x = m.example_input(64, generator=torch.Generator().manual_seed(0))
    seen = {"audio": [], "image": []}
    ha = m.audio_encoder.register_forward_hook(lambda mod, i, o: seen["audio"].append(i[0].shape[0]))
    hi = m.image_encoder.register_forward_hook(lambda mod, i, o: seen["image"].append(i[0].shape[0]))
    with torch.inference_mode():
        out = m(x, mode="execute")
    ha.remove()
    hi.remove()
    choice = out.decisions["modality"]
    assert len(choice.unique()) > 1
    assert sum(seen["audio"]) == int((choice != IMAGE).sum())
    assert sum(seen["image"]) == int((choice != AUDIO).sum())
    torch.testing.assert_close(out.cost, m.choice_costs()[choice], rtol=1e-12, atol=0)


def test_gate_bias_calibration_and_train_budget_loss():
    m = dn.create_model("test_fusion")
    x = m.example_input(128, generator=torch.Generator().manual_seed(1))
    costs = m.choice_costs() / m.static_cost
    m.calibrate(x, budget=float(costs.max()) - 1e-6)  # (nearly) every sample runs both
    with torch.inference_mode():
        assert (m.eval()(x, mode="execute").decisions["modality"] == BOTH).float().mean() > 0.9
    out = m.train()(x[:16], mode="train")
    assert "budget" in out.aux_losses and out.aux_losses["budget"].requires_grad
    (out.logits.sum() + out.aux_losses["budget"]).backward()
    assert m.gate.mlp[0].weight.grad is not None and m.gate.mlp[0].weight.grad.abs().sum() > 0


def test_pairs_share_labels_and_corruptions_are_labelled():
    spec = torch.randn(20, 8, 6)
    spec_y = torch.arange(20) % 10
    images = torch.randn(50, 1, 8, 8)
    image_y = torch.arange(50) % 10
    x, y, kind = make_audio_visual_pairs(spec, spec_y, images, image_y, seed=0, repeats=2, corrupt=0.5)
    x2, _, _ = make_audio_visual_pairs(spec, spec_y, images, image_y, seed=0, repeats=2, corrupt=0.5)
    assert x.shape == (40, 48 + 64) and torch.equal(x, x2) and torch.equal(y, spec_y.repeat(2))
    clean = (kind == 0).nonzero().squeeze(1)
    torch.testing.assert_close(x[clean, :48], spec.reshape(20, -1).repeat(2, 1)[clean])
    # Clean images come from the right class: find each in the pool.
    pool = images.reshape(50, -1)
    for i in clean.tolist():
        j = int(((pool - x[i, 48:]).abs().sum(1)).argmin())
        assert image_y[j] == y[i]
    assert set(kind.tolist()) <= {0, 1, 2}
    assert pack_pair(spec[:2], images[:2]).shape == (2, 112)
