"""The moving-digits generator: deterministic, label-bearing key frames, pictures."""

import numpy as np
import pytest
import torch

from dynaneural.temporal_wise.video.moving_digits import CLIP_MEAN, CLIP_STD, MovingDigitsConfig, make_clips
from dynaneural.temporal_wise.video.visualize import plot_clip_selection, plot_timelines


def _pool():
    g = torch.Generator().manual_seed(0)
    digits = (torch.rand(20, 16, 16, generator=g) > 0.7).float()
    return digits, torch.arange(20) % 10


def test_clips_are_deterministic_and_shaped():
    digits, labels = _pool()
    cfg = MovingDigitsConfig(frames=6, size=32, digit_size=16, visible=2, ramp=2)
    a = make_clips(digits, labels, n=8, config=cfg, rng=np.random.default_rng(1))
    b = make_clips(digits, labels, n=8, config=cfg, rng=np.random.default_rng(1))
    c = make_clips(digits, labels, n=8, config=cfg, rng=np.random.default_rng(2))
    assert a.x.shape == (8, 6, 1, 32, 32) and a.x.dtype == torch.float32
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    # Exactly `visible` consecutive key frames, fully visible; visibility falls off away from them.
    assert a.key_frames.sum(1).eq(2).all()
    assert (a.visibility[a.key_frames] == 1).all() and (a.visibility[~a.key_frames] < 1).all()
    pixels = a.x * CLIP_STD + CLIP_MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_digit_is_only_unoccluded_in_key_frames():
    digits = torch.zeros(1, 16, 16)
    digits[0, 4:12, 7:9] = 1.0  # a "1"
    cfg = MovingDigitsConfig(frames=8, visible=2, ramp=1, noise=0.0, min_speed=0.0, max_speed=0.0)
    clip = make_clips(digits, torch.tensor([1]), n=1, config=cfg, rng=np.random.default_rng(0))
    pixels = clip.x[0, :, 0] * CLIP_STD + CLIP_MEAN
    key = clip.key_frames[0]
    ink = (pixels > 0.99).flatten(1).sum(1)  # pure-white digit strokes (noise occluders stay below 1)
    assert (ink[key] == 16).all() and (ink[~key] < 16).all()


def test_bad_config():
    with pytest.raises(ValueError):
        MovingDigitsConfig(frames=4, visible=5)


def test_pictures(tmp_path):
    read = torch.tensor([[True, False, True], [False, False, True]])
    order = torch.tensor([[2, 0, -1], [2, -1, -1]])
    p = plot_timelines(read, tmp_path / "t.png", order=order, key=read, labels=[1, 2], preds=[1, 3])
    q = plot_clip_selection(torch.rand(2, 3, 1, 8, 8), read, tmp_path / "c.png", order=order, labels=[1, 2])
    assert p.stat().st_size > 1000 and q.stat().st_size > 1000
