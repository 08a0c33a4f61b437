"""The shared compacted-rows LSTM step (``layers.lstm``) against ``torch.lstm_cell``."""

import pytest
import torch

from dynaneural.layers.lstm import LSTMStep, onednn_linear_available


def _cell(lstm, x, h, c):
    return torch.lstm_cell(x, (h, c), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_inference_step_matches_lstm_cell(pack, ctx, rows):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(24, 32)
    step = LSTMStep(lstm, pack=pack)
    x, h, c = torch.randn(rows, 24), torch.randn(rows, 32), torch.randn(rows, 32)
    with ctx():
        got = step(x, (h, c))
        ref = _cell(lstm, x, h, c)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert (step.weights()[2] is not None) == (pack and onednn_linear_available())


def test_training_step_is_lstm_cell_and_differentiable():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 16)
    step = LSTMStep(lstm)
    x = torch.randn(5, 8, requires_grad=True)
    h, c = step(x, (torch.zeros(5, 16), torch.zeros(5, 16)))
    ref = _cell(lstm, x, torch.zeros(5, 16), torch.zeros(5, 16))
    assert torch.equal(h, ref[0]) and torch.equal(c, ref[1])
    h.sum().backward()
    assert x.grad is not None and lstm.weight_hh_l0.grad is not None


def test_cached_weights_follow_parameter_updates():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 16)
    step = LSTMStep(lstm)
    x, h, c = torch.randn(3, 8), torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        first = step.weights()
        assert step.weights() is first  # reused while nothing changes
        for p in lstm.parameters():
            p.add_(0.1)  # an in-place update, as an optimizer step makes
        assert step.weights() is not first
        torch.testing.assert_close(step(x, (h, c))[0], _cell(lstm, x, h, c)[0], atol=2e-6, rtol=1e-5)
        other = torch.nn.LSTM(8, 16)
        lstm.load_state_dict(other.state_dict())
        torch.testing.assert_close(step(x, (h, c))[0], _cell(other, x, h, c)[0], atol=2e-6, rtol=1e-5)


def test_rejects_unsupported_lstm():
    with pytest.raises(ValueError, match="one-layer"):
        LSTMStep(torch.nn.LSTM(4, 4, num_layers=2))
    with pytest.raises(ValueError, match="one-layer"):
        LSTMStep(torch.nn.LSTM(4, 4, bidirectional=True))


def test_copies_drop_the_cache():
    import copy
    import pickle

    from dynaneural.temporal_wise.video.encoders import RecurrentMemory

    torch.manual_seed(0)
    mem = RecurrentMemory(8, 16)
    x, h = torch.randn(3, 8), torch.zeros(3, 16)
    with torch.inference_mode():
        ref = mem.step(x, (h, h))[0]  # fills the cache (an opaque packed tensor on CPU)
    for clone in (copy.deepcopy(mem), pickle.loads(pickle.dumps(mem))):
        assert clone._step.lstm is clone.lstm
        with torch.inference_mode():
            torch.testing.assert_close(clone.step(x, (h, h))[0], ref)
