"""Synthetic sequence tasks: the adding task of the Skip RNN paper.

Paper: V. Campos, B. Jou, X. Giró-i-Nieto, J. Torres, S.-F. Chang, "Skip RNN: Learning to Skip State Updates in
Recurrent Neural Networks", ICLR 2018, arXiv:1708.06834, Sec. 4.1 (after Hochreiter & Schmidhuber, 1997).

Each step carries two features: a value drawn uniformly from [0, 1) and a marker. Exactly two steps are marked:
the first uniformly among the first 10 % of the steps, the second among the last half. The target is the sum of
the two marked values (a regression target in [0, 2), variance 1/6). The paper counts the task as *solved* when
the test MSE is two orders of magnitude below that variance (MSE < 1/600); :func:`adding_accuracy` also reports
the fraction of sequences predicted within a tolerance, which is what "accuracy" means for this task here.

A model that skips updates blindly (the Skip RNN gate sees only the state) must learn *when* markers can occur:
read densely at the start and over the second half, coast in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ADDING_SOLVED_MSE", "AddingTask", "adding_accuracy", "make_adding_task"]

#: the paper's "solved" bound: two orders of magnitude below the variance of the target (1/6)
ADDING_SOLVED_MSE = 1.0 / 600.0


@dataclass(frozen=True, eq=False)
class AddingTask:
    """Sequences (N, T, 2) (value, marker) and targets (N,) in [0, 2)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def make_adding_task(n: int, *, steps: int = 50, seed: int = 0, dtype: torch.dtype = torch.float32) -> AddingTask:
    """``n`` adding-task sequences of ``steps`` steps, deterministic given ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if steps < 4:
        raise ValueError(f"steps must be >= 4 (a first-10 % slot and a second-half slot), got {steps}")
    g = torch.Generator().manual_seed(int(seed))
    values = torch.rand(n, steps, generator=g, dtype=dtype)
    first_span = max(1, steps // 10)
    first = torch.randint(0, first_span, (n,), generator=g)
    second = torch.randint(steps - steps // 2, steps, (n,), generator=g)
    marks = torch.zeros(n, steps, dtype=dtype)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return AddingTask(x=torch.stack([values, marks], -1), y=y)


def adding_accuracy(pred: torch.Tensor, y: torch.Tensor, *, tolerance: float = 0.05) -> dict[str, float]:
    """MSE, the fraction of sequences with ``|pred - y| < tolerance``, and whether the paper's bound is met."""
    if pred.shape != y.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and y {tuple(y.shape)} differ in shape")
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    err = (pred.double() - y.double())
    mse = float((err ** 2).mean())
    return {"mse": mse, "accuracy": float((err.abs() < tolerance).double().mean()), "tolerance": float(tolerance),
            "solved": mse < ADDING_SOLVED_MSE}
