"""Step functions that a halting model ponders with: a recurrent cell, or one weight-shared residual block.

ACT (Graves 2016, arXiv:1603.08983) and PonderNet (Banino et al. 2021, arXiv:2107.05407) both repeat one step
function a data-dependent number of times and read a halting probability off the state after every step. The
two bodies here give them that step function:

* :class:`RecurrentBody` — a recurrent cell (tanh RNN or GRU) pondering on each input vector of a sequence; with
  ``first_step_flag`` the cell's input is ``[x_t, δ_{n,1}]`` (a binary flag that is 1 on the first ponder step of
  an input step, as in ACT §2) so that the network can tell a fresh input from a repeated one;
* :class:`ResidualBody` — a convolutional stem, then one residual block applied again and again to the image
  features (weights shared across repetitions, as in Universal-Transformer-style depth recurrence).

A body exposes ``encode`` (the input steps and the initial state), ``step``, ``halting`` (a logit per sample)
and ``readout`` (class logits), plus the analytic FLOPs per sample of each piece (:class:`BodyCosts`), counted
once at construction with :func:`~dynaneural.compute.flops.count_flops` on one sample, so the cost ledger charges
exactly what the static twin's hooks count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dynaneural.compute.flops import count_flops
from dynaneural.contract import DynamicModel
from dynaneural.validation import check_batch

__all__ = ["BodyCosts", "PonderBody", "PonderingModel", "RecurrentBody", "ResidualBody", "calibrate_halting_attr", "mean_execute_cost",
           "seeded_init"]


@dataclass(frozen=True)
class BodyCosts:
    """FLOPs per sample of each piece of a body (multiply-accumulates, the library's convention).

    Attributes:
        encode: the stem, once per sample. step: one ponder step. halting: one halting-unit evaluation.
        readout: the classifier, once per sample.
    """

    encode: float
    step: float
    halting: float
    readout: float


class _Call(nn.Module):
    """Wrap a bound method as a module so ``count_flops`` hooks the owner's submodules that it calls."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class PonderBody(nn.Module):
    """Interface of a step function to ponder with (see the module docstring).

    Subclasses set ``input_shape``, ``num_classes`` and ``seq_len`` (input steps; 1 for a single vector or an
    image) and call :meth:`_measure_costs` at the end of ``__init__``.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    seq_len: int
    costs: BodyCosts

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """(inputs of each input step — ``None`` where the step function takes none —, initial state)."""
        raise NotImplementedError

    def step(self, x_t: torch.Tensor | None, state: torch.Tensor, *, first: bool) -> torch.Tensor:
        """One ponder step: the next state, same shape as ``state``."""
        raise NotImplementedError

    def halting(self, state: torch.Tensor) -> torch.Tensor:
        """(B,) halting logit of each state."""
        raise NotImplementedError

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        """(B, C) class logits of a state."""
        raise NotImplementedError

    def _measure_costs(self) -> None:
        was = self.training
        self.eval()
        try:
            x = torch.zeros(1, *self.input_shape)
            inputs, s = self.encode(x)
            encode = count_flops(_Call(self, lambda v: self.encode(v)[1]), x).total
            if inputs[0] is not None:
                step = count_flops(_Call(self, lambda xt, st: self.step(xt, st, first=True)), inputs[0], s).total
            else:
                step = count_flops(_Call(self, lambda st: self.step(None, st, first=True)), s).total
            halting = count_flops(_Call(self, self.halting), s).total
            readout = count_flops(_Call(self, self.readout), s).total
        finally:
            self.train(was)
        self.costs = BodyCosts(encode=encode, step=step, halting=halting, readout=readout)


class RecurrentBody(PonderBody):
    """A recurrent cell pondering on each input vector.

    Args:
        input_size: features per input step. seq_len: input steps (``None``: the input is one vector (B, D),
            as in ACT's parity task; else (B, T, D)). hidden_size: state size. num_classes: classes read out of
            the final state. cell: ``"rnn"`` (tanh, ACT's parity network) or ``"gru"`` (PonderNet's).
        first_step_flag: append ACT's first-ponder-step flag to the cell input.
        halt_bias: initial bias of the halting unit (ACT initialises it positive so that few steps are taken
            at first).
    """

    def __init__(self, *, input_size: int, seq_len: int | None, hidden_size: int, num_classes: int,
                 cell: Literal["rnn", "gru"] = "rnn", first_step_flag: bool = True, halt_bias: float = 1.0,
                 halt_init_std: float | None = None) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_classes < 2:
            raise ValueError("input_size and hidden_size must be >= 1 and num_classes >= 2")
        if seq_len is not None and seq_len < 1:
            raise ValueError(f"seq_len must be >= 1 or None, got {seq_len}")
        cells = {"rnn": nn.RNNCell, "gru": nn.GRUCell}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        self.vector_input = seq_len is None
        self.seq_len = 1 if seq_len is None else int(seq_len)
        self.input_shape = (input_size,) if seq_len is None else (int(seq_len), input_size)
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.first_step_flag = first_step_flag
        self.cell = cells[cell](input_size + int(first_step_flag), hidden_size)
        self.halt = nn.Linear(hidden_size, 1)
        self.head = nn.Linear(hidden_size, num_classes)
        nn.init.constant_(self.halt.bias, halt_bias)
        if halt_init_std is not None:
            nn.init.normal_(self.halt.weight, std=halt_init_std)
        self._measure_costs()

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        steps: list[torch.Tensor | None] = [x] if self.vector_input else list(x.unbind(1))
        return steps, x.new_zeros(x.shape[0], self.hidden_size)

    def step(self, x_t: torch.Tensor | None, state: torch.Tensor, *, first: bool) -> torch.Tensor:
        assert x_t is not None
        if self.first_step_flag:
            x_t = torch.cat([x_t, x_t.new_full((x_t.shape[0], 1), 1.0 if first else 0.0)], dim=1)
        return self.cell(x_t, state)

    def halting(self, state: torch.Tensor) -> torch.Tensor:
        return self.halt(state).squeeze(1)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return self.head(state)


class _SharedBlock(nn.Module):
    """conv-BN-ReLU-conv-BN with an identity shortcut and a final ReLU (a ResNet basic block, stride 1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class ResidualBody(PonderBody):
    """A conv stem, then one weight-shared residual block applied at every ponder step.

    Args:
        in_chans, input_size: image shape (C, S, S). width: feature channels. stem_stride: stride of the stem
        conv (a cheaper state). num_classes: classes. halt_bias: initial halting-unit bias.
    """

    def __init__(self, *, in_chans: int, input_size: int, width: int, num_classes: int, stem_stride: int = 2,
                 halt_bias: float = 1.0, halt_init_std: float | None = None) -> None:
        super().__init__()
        if in_chans < 1 or input_size < 1 or width < 1 or num_classes < 2:
            raise ValueError("in_chans, input_size and width must be >= 1 and num_classes >= 2")
        self.input_shape = (in_chans, input_size, input_size)
        self.num_classes = num_classes
        self.seq_len = 1
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block = _SharedBlock(width)
        # Halting unit and classifier read the globally pooled state; the pool is a module so that the FLOPs
        # counter charges it (1 per element) in both the dynamic model and its static twin.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.halt = nn.Linear(width, 1)
        self.head = nn.Linear(width, num_classes)
        nn.init.constant_(self.halt.bias, halt_bias)
        if halt_init_std is not None:
            nn.init.normal_(self.halt.weight, std=halt_init_std)
        self._measure_costs()

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        return [None], self.stem(x)

    def step(self, x_t: torch.Tensor | None, state: torch.Tensor, *, first: bool) -> torch.Tensor:
        return self.block(state)

    def halting(self, state: torch.Tensor) -> torch.Tensor:
        return self.halt(self.pool(state).flatten(1)).squeeze(1)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(state).flatten(1))


class PonderingModel(DynamicModel):
    """Shared part of ACT and PonderNet: a body pondered for at most ``max_steps`` steps per input step.

    Args:
        body: the step function (:class:`RecurrentBody` or :class:`ResidualBody`).
        max_steps: the most ponder steps per input step (ACT's M, PonderNet's N).
    """

    def __init__(self, body: PonderBody, *, max_steps: int) -> None:
        super().__init__()
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.body = body
        self.max_steps = max_steps
        self.input_shape = body.input_shape
        self.num_classes = body.num_classes
        self._all_on = False

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Nothing halts early: every sample runs ``max_steps`` ponder steps per input step."""
        before, self._all_on = self._all_on, True
        try:
            yield
        finally:
            self._all_on = before

    def full_cost(self) -> float:
        """FLOPs per sample with every ponder step run (the static twin's cost)."""
        c, m = self.body.costs, self.max_steps
        return c.encode + self.body.seq_len * (m * c.step + (m - 1) * c.halting) + c.readout

    def _check(self, x: object) -> torch.Tensor:
        return check_batch(x, input_shape=self.body.input_shape)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules from a fixed seed without touching the global RNG (tiny test variants whose random init
    must take varied halting decisions whatever the caller's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bcast(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) weights viewed to broadcast over a state (n, ...)."""
    return p.view(-1, *([1] * (like.dim() - 1)))


@torch.inference_mode()
def mean_execute_cost(model: DynamicModel, x: torch.Tensor, *, batch_size: int = 512) -> tuple[float, float]:
    """(mean FLOPs per sample, mean of ``decisions["steps"]``) of ``model`` on ``x`` in execute mode."""
    was = model.training
    model.eval()
    try:
        costs, steps = [], []
        for i in range(0, x.shape[0], batch_size):
            out = model(x[i:i + batch_size], mode="execute")
            costs.append(out.cost)
            steps.append(out.decisions["steps"].double())
    finally:
        model.train(was)
    return float(torch.cat(costs).mean()), float(torch.cat(steps).mean())


def calibrate_halting_attr(model: Any, x: torch.Tensor, *, attr: str, budget: float,
                           unit: Literal["fraction", "flops", "steps"], lo: float, hi: float,
                           batch_size: int = 512) -> Any:
    """Fit the float attribute ``attr`` of a halting model (ACT's ε, PonderNet's threshold) so that the mean
    execute cost on ``x`` meets ``budget``: a ``fraction`` of ``model.full_cost()``, ``flops`` per sample or mean
    ponder ``steps``. Bisection by :func:`~dynaneural.calibration.calibrate_knob`; raises ``ValueError`` with the
    model unchanged when the budget is out of reach."""
    from dynaneural.calibration import calibrate_knob

    full = model.full_cost()

    def mean_cost(v: float) -> float:
        before = getattr(model, attr)
        setattr(model, attr, v)
        try:
            flops, steps = mean_execute_cost(model, x, batch_size=batch_size)
        finally:
            setattr(model, attr, before)
        return {"fraction": flops / full, "flops": flops, "steps": steps}[unit]

    return calibrate_knob(mean_cost=mean_cost, set_knob=lambda v: setattr(model, attr, float(v)), budget=budget,
                          lo=lo, hi=hi, unit=unit, current=getattr(model, attr))
