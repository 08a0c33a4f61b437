"""Audio features computed with torch only: STFT power spectrum, mel filterbank, log-mel spectrogram and MFCC.

The mel scale is HTK's, ``mel(f) = 2595 log10(1 + f / 700)`` (S. Young et al., The HTK Book); the filterbank is
``n_mels`` triangles with apexes equally spaced in mel between ``f_min`` and ``f_max``, each rising from the
previous apex to its own and falling to the next (height 1, so neighbouring filters sum to 1 between the first and
last apex); ``norm="slaney"`` scales each triangle to unit area instead (librosa's default). MFCCs are the
orthonormal DCT-II of the log-mel energies (Davis & Mermelstein, IEEE TASSP 1980).

Shapes: waveforms (B, L) → features (B, T, F) with time first, as the temporal models read them; with
``center=True`` (zero padding of n_fft // 2 on both sides) T = 1 + L // hop_length.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["LogMelSpectrogram", "MFCC", "FeatureNormalizer", "dct_matrix", "hz_to_mel", "mel_filterbank", "mel_to_hz",
           "power_spectrogram"]


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor | float) -> torch.Tensor:
    return 700.0 * (10.0 ** (torch.as_tensor(m, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(*, n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None,
                   norm: Literal["none", "slaney"] = "none") -> torch.Tensor:
    """(n_freqs, n_mels) float32 triangular mel filters over the STFT bins ``k * sample_rate / n_fft``
    (``n_freqs = n_fft // 2 + 1``)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    if n_mels < 1 or n_freqs < 2:
        raise ValueError(f"need n_mels >= 1 and n_freqs >= 2, got {n_mels}, {n_freqs}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (n_freqs,)
    apex = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                    dtype=torch.float64))  # (n_mels + 2,) edges and apexes in Hz
    lower, centre, upper = apex[:-2], apex[1:-1], apex[2:]
    rise = (freqs[:, None] - lower[None]) / (centre - lower)[None]
    fall = (upper[None] - freqs[:, None]) / (upper - centre)[None]
    fb = torch.clamp(torch.minimum(rise, fall), min=0.0)  # (n_freqs, n_mels)
    if norm == "slaney":
        fb = fb * (2.0 / (upper - lower))[None]
    elif norm != "none":
        raise ValueError(f"norm must be 'none' or 'slaney', got {norm!r}")
    return fb.float()


def dct_matrix(n_mfcc: int, n_mels: int) -> torch.Tensor:
    """(n_mels, n_mfcc) orthonormal DCT-II: ``mfcc = logmel @ D``; D^T D = I when n_mfcc = n_mels."""
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"n_mfcc must lie in [1, n_mels={n_mels}], got {n_mfcc}")
    n = torch.arange(n_mels, dtype=torch.float64)
    k = torch.arange(n_mfcc, dtype=torch.float64)
    d = torch.cos(math.pi / n_mels * (n[:, None] + 0.5) * k[None])  # (n_mels, n_mfcc)
    d[:, 0] *= 1.0 / math.sqrt(2.0)
    return (d * math.sqrt(2.0 / n_mels)).float()


def power_spectrogram(wave: torch.Tensor, *, n_fft: int, hop_length: int, win_length: int | None = None,
                      center: bool = True) -> torch.Tensor:
    """(B, L) → (B, T, n_fft // 2 + 1) power |STFT|^2 with a periodic Hann window."""
    if wave.dim() != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(wave.shape)}")
    win_length = win_length or n_fft
    window = torch.hann_window(win_length, periodic=True, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window,
                      center=center, pad_mode="constant", return_complex=True)  # (B, n_freqs, T)
    return spec.abs().pow(2).transpose(1, 2)


class LogMelSpectrogram(nn.Module):
    """Waveforms (B, L) → log-mel energies (B, T, n_mels): ``log(mel_fb^T |STFT|^2 + eps)``.

    Args:
        sample_rate: Hz. n_fft: FFT size. hop_length: samples between frames. win_length: window (default n_fft).
        n_mels: mel bands. f_min, f_max: band edges in Hz. eps: floor inside the log. norm: filter normalisation.
    """

    def __init__(self, *, sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 80,
                 win_length: int | None = None, n_mels: int = 32, f_min: float = 20.0, f_max: float | None = None,
                 eps: float = 1e-6, norm: Literal["none", "slaney"] = "none") -> None:
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length, self.win_length = sample_rate, n_fft, hop_length, win_length
        self.n_mels, self.eps = n_mels, eps
        self.register_buffer("fb", mel_filterbank(n_freqs=n_fft // 2 + 1, n_mels=n_mels, sample_rate=sample_rate,
                                                  f_min=f_min, f_max=f_max, norm=norm), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = power_spectrogram(wave, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length)
        return torch.log(power @ self.fb + self.eps)  # (B, T, n_mels)


class MFCC(nn.Module):
    """Waveforms (B, L) → MFCCs (B, T, n_mfcc): the orthonormal DCT-II of :class:`LogMelSpectrogram`."""

    def __init__(self, *, n_mfcc: int = 13, **logmel_kwargs: object) -> None:
        super().__init__()
        self.logmel = LogMelSpectrogram(**logmel_kwargs)  # type: ignore[arg-type]
        self.register_buffer("dct", dct_matrix(n_mfcc, self.logmel.n_mels), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.logmel(wave) @ self.dct


class FeatureNormalizer(nn.Module):
    """Per-band standardisation with statistics fitted on training features (B, T, F)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> FeatureNormalizer:
        flat = feats.reshape(-1, feats.shape[-1]).double()
        self.mean.copy_(flat.mean(0).float())
        self.std.copy_(flat.std(0).clamp(min=1e-5).float())
        return self

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std
