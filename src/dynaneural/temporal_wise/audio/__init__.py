"""Audio methods: log-mel / MFCC features (torch only), early exit over time on FSDD, gated audio-visual fusion."""

from dynaneural.temporal_wise.audio import audio_exit, features, fusion  # noqa: F401
