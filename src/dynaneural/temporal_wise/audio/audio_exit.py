"""Early exit over time on spoken digits: read a log-mel spectrogram chunk by chunk, stop once confident.

The early-exit rule of BranchyNet (Teerapittayanon et al., ICPR 2016, arXiv:1709.01686) applied along time, as
in early-stopping sequence readers (Yu et al., "Learning to Skim Text", ACL 2017, arXiv:1704.06877): a small MLP
encodes each chunk of ``chunk`` spectrogram frames, an LSTM memory accumulates them, a classifier reads the memory
after every chunk, and a sample leaves at the first chunk whose exit-rule score reaches the threshold — the rest of
its spectrogram is never read. The machinery (modes, compaction, ledger, calibration) is
:class:`~dynaneural.temporal_wise.video.frame_exit.RecurrentExitNetwork`; this file defines the audio encoder and
the registered models. Inputs are spectrograms (B, T, F) with time first (``features.LogMelSpectrogram``).
"""

from __future__ import annotations

import torch
from torch import nn

from dynaneural.registry import register_model
from dynaneural.temporal_wise.video.frame_exit import RecurrentExitNetwork

__all__ = ["ChunkEncoder", "audio_exit_fsdd", "test_audio_exit"]


class ChunkEncoder(nn.Sequential):
    """A chunk of spectrogram frames, flattened (n, chunk·F), through ``depth`` Linear-ReLU layers → (n, width)."""

    def __init__(self, in_features: int, *, width: int = 128, depth: int = 2) -> None:
        layers: list[nn.Module] = []
        prev = in_features
        for _ in range(depth):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        super().__init__(*layers)
        self.out_features = prev


def _audio_exit(*, frames: int, n_mels: int, chunk: int, width: int, depth: int, hidden: int, num_classes: int,
                exit_rule: str, exit_threshold: float, min_steps: int) -> RecurrentExitNetwork:
    return RecurrentExitNetwork(encoder=ChunkEncoder(chunk * n_mels, width=width, depth=depth), hidden_size=hidden,
                                num_classes=num_classes, input_shape=(frames, n_mels), chunk=chunk,
                                exit_rule=exit_rule, exit_threshold=exit_threshold, min_steps=min_steps,
                                step_weights="linear")


@register_model
def audio_exit_fsdd(*, frames: int = 100, n_mels: int = 32, chunk: int = 5, width: int = 128, depth: int = 2,
                    hidden: int = 128, num_classes: int = 10, exit_rule: str = "confidence",
                    exit_threshold: float = float("inf"), min_steps: int = 2) -> RecurrentExitNetwork:
    """FSDD log-mel spectrograms (B, 100, 32) (1 s at 8 kHz, 10 ms hop): 20 chunks of 50 ms, MLP 128, LSTM 128."""
    return _audio_exit(frames=frames, n_mels=n_mels, chunk=chunk, width=width, depth=depth, hidden=hidden,
                       num_classes=num_classes, exit_rule=exit_rule, exit_threshold=exit_threshold,
                       min_steps=min_steps)


@register_model
def test_audio_exit(*, exit_rule: str = "confidence", exit_threshold: float | None = None) -> RecurrentExitNetwork:
    """Tiny variant for tests: spectrograms (B, 8, 6), chunks of 2, 3 classes; the threshold is calibrated at init
    on a fixed random batch to 60 % of the static cost, so samples exit at different steps."""
    model = _audio_exit(frames=8, n_mels=6, chunk=2, width=8, depth=1, hidden=8, num_classes=3, exit_rule=exit_rule,
                        exit_threshold=0.5 if exit_threshold is None else exit_threshold, min_steps=1)
    if exit_threshold is None:
        with torch.no_grad():
            model.classifier.weight.mul_(8.0)  # spread the random-init confidences across samples
        model.calibrate(model.example_input(64, generator=torch.Generator().manual_seed(123)), budget=0.6)
    return model
