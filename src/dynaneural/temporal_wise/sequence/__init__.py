"""Sequence methods: skip recurrent updates (Skip RNN), jump over tokens (LSTM-Jump), stop reading early, and
update only part of the state (Skim-RNN), over token ids or feature sequences."""

from dynaneural.temporal_wise.sequence import early_stop, lstm_jump, skim_rnn, skip_rnn  # noqa: F401
from dynaneural.temporal_wise.sequence.early_stop import EarlyStopConfig, EarlyStopOutput, EarlyStopReader
from dynaneural.temporal_wise.sequence.lstm_jump import LSTMJump, LSTMJumpConfig, LSTMJumpOutput
from dynaneural.temporal_wise.sequence.skim_rnn import SkimRNN, SkimRNNConfig
from dynaneural.temporal_wise.sequence.skip_rnn import SkipRNN, SkipRNNConfig, SkipRNNOutput

__all__ = ["EarlyStopConfig", "EarlyStopOutput", "EarlyStopReader", "LSTMJump", "LSTMJumpConfig", "LSTMJumpOutput",
           "SkimRNN", "SkimRNNConfig", "SkipRNN", "SkipRNNConfig", "SkipRNNOutput"]
