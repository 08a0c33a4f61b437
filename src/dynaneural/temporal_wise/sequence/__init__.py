"""Sequence methods: skip recurrent updates (Skip RNN), jump over tokens (LSTM-Jump), stop reading early, and
update only part of the state (Skim-RNN), over token ids or feature sequences."""

from dynaneural.temporal_wise.sequence import skip_rnn  # noqa: F401
from dynaneural.temporal_wise.sequence.skip_rnn import SkipRNN, SkipRNNConfig, SkipRNNOutput

__all__ = ["SkipRNN", "SkipRNNConfig", "SkipRNNOutput"]
