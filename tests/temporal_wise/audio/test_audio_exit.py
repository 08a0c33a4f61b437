"""Early exit over time on spectrograms: chunks after the exit are never read."""

import torch

import dynaneural as dn


def test_chunks_after_exit_are_not_encoded():
    m = dn.create_model("test_audio_exit").eval()
    x = m.example_input(32, generator=torch.Generator().manual_seed(0))
    rows = []
    h = m.encoder.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape))
    with torch.inference_mode():
        out = m(x, mode="execute")
    h.remove()
    steps = out.decisions["exit_step"]
    assert [r[0] for r in rows] == [int((steps >= t).sum()) for t in range(len(rows))]
    assert all(r[1] == m.chunk * 6 for r in rows)  # a step reads one chunk of frames, flattened
    assert out.decisions["frames"].shape == (32, m.num_steps)
    assert 0 < out.decisions["frames"].float().mean() < 1


def test_audio_model_reads_spectrogram_chunks_in_order():
    m = dn.create_model("test_audio_exit", exit_threshold=float("inf")).eval()
    x = m.example_input(3)
    steps = m._steps(x)
    torch.testing.assert_close(steps[:, 1], x[:, 2:4].reshape(3, -1))
    with torch.inference_mode():
        torch.testing.assert_close(m(x, mode="execute").logits, m.to_static()(x), rtol=1e-4, atol=1e-4)


def test_registered_full_size_model_shapes():
    m = dn.create_model("audio_exit_fsdd").eval()
    assert m.input_shape == (100, 32) and m.num_steps == 20
    m.exit_threshold.fill_(0.5)
    with torch.inference_mode():
        out = m(torch.randn(4, 100, 32), mode="execute")
    assert out.logits.shape == (4, 10)
