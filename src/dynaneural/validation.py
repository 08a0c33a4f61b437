"""Input checks with clear messages: a bad batch fails loudly before any work is done."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_batch", "check_budget"]


def check_batch(x: object, *, input_shape: Sequence[int] | None, check_finite: bool = True,
                name: str = "input") -> torch.Tensor:
    """Validate a model input batch of shape (B, *input_shape).

    Raises:
        TypeError: not a tensor, or not a floating-point dtype.
        ValueError: wrong number of dimensions or shape, empty batch, NaN or infinite values.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (e.g. float32), got dtype {x.dtype}; "
                        "convert images with x.float() and normalise them as the training data was")
    if input_shape is not None:
        expected = tuple(int(d) for d in input_shape)
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (batch size 0); pass at least one sample")
    if check_finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} of {x.shape[0]} samples")
    return x


def check_budget(value: float, *, low: float, high: float, unit: str) -> float:
    """Check a compute budget lies in the achievable range [low, high] of the model."""
    if not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"budget must be a number, got {value!r}")
    if not (low <= value <= high):
        raise ValueError(f"budget {value:g} {unit} is out of range: this model can spend between {low:g} and "
                         f"{high:g} {unit} per sample")
    return float(value)
