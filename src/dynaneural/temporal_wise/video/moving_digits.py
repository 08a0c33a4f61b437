"""A deterministic "moving digits" video set built from real MNIST digits, where only a few frames matter.

In the spirit of Moving MNIST (Srivastava, Mansimov, Salakhutdinov, "Unsupervised Learning of Video
Representations using LSTMs", ICML 2015, arXiv:1502.04681), but made for *frame selection*: one MNIST digit
(down-scaled to ``digit_size``) moves over a ``size × size`` canvas with a constant velocity, bouncing off the
borders, and is hidden under a noise occluder in most frames. Only in a window of ``visible`` consecutive
*key frames* (placed uniformly at random in the clip) is it fully visible; in the ``ramp`` frames on either side of
the window the occluder shrinks as the window approaches (a cue a frame-selection policy can follow), and farther
away the digit is fully covered. The label is the digit's class: the key frames carry it, the others little or
nothing, so a model that looks at the right frames can skip most of the clip.

Clips are drawn from MNIST's own train / validation / test images (``dynaneural.data.load_dataset("mnist")``),
so no digit image is shared between splits, and every split is a pure function of ``seed`` and the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynaneural.data import NORMALIZATION, load_dataset

__all__ = ["CLIP_MEAN", "CLIP_STD", "MovingDigits", "MovingDigitsConfig", "MovingDigitsSplits", "load_moving_digits",
           "make_clips"]

#: clips are normalised as (x - CLIP_MEAN) / CLIP_STD from their 0..1 pixels (about the train-set statistics).
CLIP_MEAN, CLIP_STD = 0.1, 0.3


@dataclass(frozen=True)
class MovingDigitsConfig:
    """Args:
    frames: T, frames per clip. size: canvas height = width. digit_size: the MNIST digit is resized to this.
    visible: number of consecutive key frames where the digit is unoccluded. ramp: frames on either side of the key
    window where the occluder covers only part of the digit (shrinking toward the window).
    min_speed, max_speed: pixels per frame. noise: std of the Gaussian background noise (0..1 pixel scale).
    """

    frames: int = 10
    size: int = 32
    digit_size: int = 16
    visible: int = 2
    ramp: int = 2
    min_speed: float = 1.0
    max_speed: float = 3.0
    noise: float = 0.05

    def __post_init__(self) -> None:
        if not 1 <= self.visible <= self.frames:
            raise ValueError(f"visible must lie in [1, frames={self.frames}], got {self.visible}")
        if not 4 <= self.digit_size <= self.size:
            raise ValueError(f"digit_size must lie in [4, size={self.size}], got {self.digit_size}")
        if self.ramp < 0 or self.noise < 0 or not 0 <= self.min_speed <= self.max_speed:
            raise ValueError("ramp and noise must be >= 0 and 0 <= min_speed <= max_speed")


@dataclass(frozen=True, eq=False)
class MovingDigits:
    """One split.

    Attributes:
        x: clips, float32 (N, T, 1, size, size), normalised with ``CLIP_MEAN`` / ``CLIP_STD``.
        y: digit labels, int64 (N,).
        key_frames: (N, T) bool, the frames where the digit is fully visible.
        visibility: (N, T) float32, the unoccluded fraction of the digit in each frame.
    """

    x: torch.Tensor
    y: torch.Tensor
    key_frames: torch.Tensor
    visibility: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class MovingDigitsSplits:
    train: MovingDigits
    val: MovingDigits
    test: MovingDigits
    config: MovingDigitsConfig
    num_classes: int = 10

    def as_dict(self) -> dict[str, object]:
        return {"config": asdict(self.config), "sizes": {k: len(getattr(self, k)) for k in ("train", "val", "test")}}


def _bounce(p0: float, v: float, steps: int, limit: float) -> np.ndarray:
    """Positions p0 + v t reflected into [0, limit]."""
    p = p0 + v * np.arange(steps)
    if limit <= 0:
        return np.zeros(steps)
    period = 2 * limit
    p = np.mod(p, period)
    return np.where(p > limit, period - p, p)


def make_clips(digits: torch.Tensor, labels: torch.Tensor, *, n: int, config: MovingDigitsConfig,
               rng: np.random.Generator) -> MovingDigits:
    """Render ``n`` clips from a pool of digit images.

    Args:
        digits: (M, digit_size, digit_size) float pixels in [0, 1].
        labels: (M,) labels.
        n: clips to render.
        config: the generator's settings.
        rng: the random generator (consumed; the result is a pure function of its state).
    """
    cfg = config
    t_len, s, d = cfg.frames, cfg.size, cfg.digit_size
    pool = digits.numpy()
    canvas = np.zeros((n, t_len, s, s), dtype=np.float32)
    key = np.zeros((n, t_len), dtype=bool)
    vis = np.zeros((n, t_len), dtype=np.float32)
    idx = rng.integers(0, len(pool), size=n)
    for i in range(n):
        digit = pool[idx[i]]
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(cfg.min_speed, cfg.max_speed)
        xs = _bounce(rng.uniform(0, s - d), speed * np.cos(angle), t_len, s - d)
        ys = _bounce(rng.uniform(0, s - d), speed * np.sin(angle), t_len, s - d)
        k0 = int(rng.integers(0, t_len - cfg.visible + 1))
        side = int(rng.integers(0, 4))  # which side the occluder grows from
        noise = rng.uniform(0.3, 1.0, size=(t_len, d, d)).astype(np.float32)
        for t in range(t_len):
            dist = max(k0 - t, t - (k0 + cfg.visible - 1), 0)
            v = 1.0 if dist == 0 else max(0.0, 0.5 * (1.0 - (dist - 1) / max(cfg.ramp, 1))) if dist <= cfg.ramp else 0.0
            key[i, t], vis[i, t] = dist == 0, v
            patch = digit.copy()
            hidden = int(round((1.0 - v) * d))
            if hidden:
                sl = [slice(None), slice(None)]
                sl[side % 2] = slice(0, hidden) if side < 2 else slice(d - hidden, d)
                patch[tuple(sl)] = noise[t][tuple(sl)]
            r, c = int(round(ys[t])), int(round(xs[t]))
            canvas[i, t, r:r + d, c:c + d] = np.maximum(canvas[i, t, r:r + d, c:c + d], patch)
    if cfg.noise:
        canvas += rng.normal(0.0, cfg.noise, size=canvas.shape).astype(np.float32)
    x = torch.from_numpy(np.clip(canvas, 0.0, 1.0)).sub_(CLIP_MEAN).div_(CLIP_STD).unsqueeze(2)
    return MovingDigits(x=x, y=labels[torch.from_numpy(idx)].long().clone(), key_frames=torch.from_numpy(key),
                        visibility=torch.from_numpy(vis))


def _pixels(x: torch.Tensor, digit_size: int) -> torch.Tensor:
    """Normalised MNIST (N, 1, 28, 28) -> 0..1 pixels resized to (N, digit_size, digit_size)."""
    mean, std = NORMALIZATION["mnist"]
    img = (x * std[0] + mean[0]).clamp_(0, 1)
    if digit_size != img.shape[-1]:
        img = F.interpolate(img, size=(digit_size, digit_size), mode="area")
    return img[:, 0]


def load_moving_digits(*, data_dir: str | Path | None = None, seed: int = 0, n_train: int = 4000, n_val: int = 1000,
                       n_test: int = 2000, config: MovingDigitsConfig | None = None) -> MovingDigitsSplits:
    """Generate the train / val / test clips from MNIST's train / val / test digits (md5-checked files).

    Args:
        data_dir: data folder holding ``mnist/`` (else ``$DYNANEURAL_DATA``).
        seed: seed of the MNIST validation split and of the clip generator; equal seeds give equal clips.
        n_train, n_val, n_test: clips per split.
        config: generator settings (default :class:`MovingDigitsConfig`).
    """
    cfg = config or MovingDigitsConfig()
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    mnist = load_dataset("mnist", data_dir=data_dir, seed=seed)
    parts = {}
    for k, (split, xs, ys, n) in enumerate((("train", mnist.train_x, mnist.train_y, n_train),
                                            ("val", mnist.val_x, mnist.val_y, n_val),
                                            ("test", mnist.test_x, mnist.test_y, n_test))):
        rng = np.random.default_rng([seed, k, 20240601])
        parts[split] = make_clips(_pixels(xs, cfg.digit_size), ys, n=n, config=cfg, rng=rng)
    return MovingDigitsSplits(train=parts["train"], val=parts["val"], test=parts["test"], config=cfg)
