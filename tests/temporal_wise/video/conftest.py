"""The check shared by the streamed-execution tests of the video/audio models (AdaFrame, frame exit)."""

import pytest
import torch


def _assert_stream_matches_execute(ref, got, calls, *, keys, slots, n):
    """``got`` (``slots=`` execution of ``n`` sequences) gives each sequence ``ref``'s (plain execute) decisions
    ``keys``, logits and cost; the encoder (``calls``: its batch sizes) reads every step read exactly once, never
    more than ``slots`` sequences at a time."""
    for key in keys:
        assert torch.equal(got.decisions[key], ref.decisions[key]), key
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.cost, ref.cost, rtol=1e-12, atol=0)
    assert sum(calls) == int(ref.decisions["frames"].sum())
    assert calls[0] == min(slots, n) and max(calls) <= slots


@pytest.fixture
def assert_stream_matches_execute():
    return _assert_stream_matches_execute
