"""Temporal-wise dynamic networks: skipping, jumping and early stopping over sequences, audio and video."""

from dynaneural.temporal_wise import audio, sequence, video  # noqa: F401
