"""FSDD as log-mel spectrograms for the audio models: waveforms from :func:`dynaneural.data.load_fsdd`, features
from :mod:`dynaneural.temporal_wise.audio.features`, standardised per band with train-set statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynaneural.data.fsdd import load_fsdd
from dynaneural.temporal_wise.audio.features import FeatureNormalizer, LogMelSpectrogram

__all__ = ["SpectrogramSplits", "load_fsdd_logmel"]


@dataclass(frozen=True, eq=False)
class SpectrogramSplits:
    """Standardised log-mel spectrograms (N, T, F) and labels per split, and the feature settings."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    frames: int
    n_mels: int
    settings: dict[str, float]


@torch.no_grad()
def load_fsdd_logmel(*, data_dir: str | Path | None = None, seed: int = 0, val_size: int = 300,
                     train_limit: int | None = None, max_seconds: float = 1.0, n_mels: int = 32, n_fft: int = 256,
                     hop_length: int = 80, frames: int | None = 100) -> SpectrogramSplits:
    """Official FSDD split (index 0–4 test), validation carved from train; 1 s windows (cut or zero-padded at the
    end), log-mel with a 32 ms window and 10 ms hop, cut to ``frames`` frames (None = all), standardised."""
    splits = load_fsdd(data_dir=data_dir, seed=seed, val_size=val_size, train_limit=train_limit,
                       max_seconds=max_seconds)
    logmel = LogMelSpectrogram(sample_rate=8000, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)

    def feats(x: torch.Tensor) -> torch.Tensor:
        f = logmel(x.flatten(1))
        return f[:, :frames] if frames is not None else f

    train, val, test = feats(splits.train_x), feats(splits.val_x), feats(splits.test_x)
    norm = FeatureNormalizer(n_mels).fit(train)
    return SpectrogramSplits(train_x=norm(train), train_y=splits.train_y, val_x=norm(val), val_y=splits.val_y,
                             test_x=norm(test), test_y=splits.test_y, frames=train.shape[1], n_mels=n_mels,
                             settings={"max_seconds": max_seconds, "n_fft": n_fft, "hop_length": hop_length})
