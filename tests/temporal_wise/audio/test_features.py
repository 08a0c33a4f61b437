"""Log-mel / MFCC computed with torch only, checked against first principles (no librosa)."""

import math

import pytest
import torch

from dynaneural.temporal_wise.audio.features import (
    MFCC,
    FeatureNormalizer,
    LogMelSpectrogram,
    dct_matrix,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    power_spectrogram,
)


def test_mel_scale_round_trip_and_htk_anchor():
    f = torch.tensor([0.0, 440.0, 1000.0, 3999.0])
    torch.testing.assert_close(mel_to_hz(hz_to_mel(f)), f.double(), rtol=1e-9, atol=1e-6)
    assert float(hz_to_mel(1000.0)) == pytest.approx(1000.0, abs=0.1)  # HTK: 1000 Hz ~ 1000 mel


def test_filterbank_properties():
    fb = mel_filterbank(n_freqs=129, n_mels=20, sample_rate=8000, f_min=0.0)
    assert fb.shape == (129, 20) and (fb >= 0).all() and fb.max() <= 1 + 1e-6
    freqs = torch.linspace(0, 4000, 129)
    peaks = freqs[fb.argmax(0)]
    assert (peaks[1:] > peaks[:-1]).all()  # apexes increase with the band index
    widths = (fb > 0).sum(0)
    assert (widths[1:] >= widths[:-1] - 1).all()  # bands widen with frequency (mel spacing)
    # Unnormalised triangles sum to 1 between the first and the last apex (a partition of unity).
    apex = mel_to_hz(torch.linspace(0, float(hz_to_mel(4000.0)), 22))[1:-1].float()
    inside = (freqs >= apex[0]) & (freqs <= apex[-1])
    torch.testing.assert_close(fb[inside].sum(1), torch.ones(int(inside.sum())), rtol=0, atol=1e-5)
    area = mel_filterbank(n_freqs=129, n_mels=20, sample_rate=8000, norm="slaney")
    assert torch.isfinite(area).all() and (area.sum(0) > 0).all()


def test_pure_tone_peaks_at_its_bin_and_band():
    sr, n_fft, f0 = 8000, 256, 1000.0
    t = torch.arange(sr) / sr
    wave = torch.sin(2 * math.pi * f0 * t)[None]
    power = power_spectrogram(wave, n_fft=n_fft, hop_length=80)
    assert power.shape == (1, 1 + sr // 80, n_fft // 2 + 1)
    assert int(power[0, 50].argmax()) == round(f0 * n_fft / sr)  # bin 32
    logmel = LogMelSpectrogram(sample_rate=sr, n_fft=n_fft, hop_length=80, n_mels=32, f_min=0.0)
    band = int(logmel(wave)[0, 50].argmax())
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(4000.0)), 34))[1:-1]
    assert band == int((centres - f0).abs().argmin())


def test_parseval_energy_of_white_noise():
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(1, 8000, generator=g)
    power = power_spectrogram(wave, n_fft=256, hop_length=256, center=False)
    # One-sided spectrum with Hann window: sum |X|^2 ~ (n_fft/2) * sum(w^2) * sigma^2 on average.
    w2 = torch.hann_window(256, periodic=True).pow(2).sum()
    full = power[..., 1:-1].sum(-1) * 2 + power[..., 0] + power[..., -1]
    assert float(full.mean() / (256 * w2)) == pytest.approx(1.0, rel=0.1)


def test_dct_is_orthonormal_and_mfcc_of_flat_logmel():
    d = dct_matrix(16, 16)
    torch.testing.assert_close(d.T @ d, torch.eye(16), rtol=0, atol=1e-5)
    flat = torch.full((1, 3, 16), 2.0)
    c = flat @ d
    assert c[..., 1:].abs().max() < 1e-5 and float(c[0, 0, 0]) == pytest.approx(2.0 * 4.0)  # sqrt(16) * 2
    mfcc = MFCC(n_mfcc=13, n_mels=32)(torch.randn(2, 4000))
    assert mfcc.shape == (2, 51, 13) and torch.isfinite(mfcc).all()


def test_normalizer_and_bad_input():
    feats = torch.randn(10, 5, 4) * 3 + 1
    norm = FeatureNormalizer(4).fit(feats)
    out = norm(feats)
    torch.testing.assert_close(out.reshape(-1, 4).mean(0), torch.zeros(4), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        power_spectrogram(torch.randn(100), n_fft=64, hop_length=16)
    with pytest.raises(ValueError):
        mel_filterbank(n_freqs=65, n_mels=8, sample_rate=8000, f_min=5000.0)
