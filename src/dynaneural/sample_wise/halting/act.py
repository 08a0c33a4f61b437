"""Adaptive Computation Time: a learned, per-sample number of ponder steps with a remainder and a ponder cost.

Paper: A. Graves, "Adaptive Computation Time for Recurrent Neural Networks", arXiv:1603.08983 (2016).

At input step t the step function S is applied repeatedly, ``s^n = S(s^{n-1}, x^n)`` with ``s^0`` the previous
input step's state and ``x^n = [x_t, δ_{n,1}]`` (the first-step flag, for recurrent cells). After each step a
halting unit gives ``h^n = σ(W_h s^n + b_h)``. Pondering stops at

    N = min{ n : Σ_{m≤n} h^m ≥ 1 - ε }   (and at most M steps),

the *remainder* is ``R = 1 - Σ_{n<N} h^n`` and the halting distribution is ``p^n = h^n`` for n < N and
``p^N = R`` (so Σ p = 1). The state passed on (and read out) is the mean ``s = Σ_n p^n s^n``. The *ponder cost*
``ρ = Σ_t (N(t) + R(t))`` is added to the loss with weight τ; N is piecewise constant, so its gradient flows
through the remainder alone (``∂ρ/∂h^n = -1`` for n < N), pushing the network to halt earlier.

Modes: ``execute`` keeps a compact sub-batch of the samples still pondering — at every ponder step the samples
that halt leave it (their mean state is scattered back into the output) and the step function runs on the rest
only. ``simulate`` runs all M steps on every sample and applies :func:`act_halting` to the halting
probabilities (masks). ``train`` is the compact path with autograd. All three charge the cost ledger with what
each sample ran: the stem, N(t) steps and min(N(t), M-1) halting units per input step (the halting unit is not
needed at step M, where pondering stops anyway), and the readout.

Two bodies (``steps.py``): a recurrent cell pondering per input step, and a weight-shared residual block applied
to image features until the halting sum reaches 1 - ε. ``max_steps=1`` is the same network without ACT (one step,
no halting unit): the baseline of the parity experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dynaneural.calibration.thresholds import KnobCalibration
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import resolve_mode
from dynaneural.execution import Mode, rows_where
from dynaneural.outputs import DynamicOutput
from dynaneural.registry import register_model
from dynaneural.sample_wise.halting.steps import (
    PonderBody,
    PonderingModel,
    RecurrentBody,
    ResidualBody,
    _bcast,
    calibrate_halting_attr,
    seeded_init,
)

__all__ = ["ACTOutput", "ACTUnrolled", "AdaptiveComputationTime", "act_halting", "calibrate_act_eps"]


@dataclass
class ACTOutput(DynamicOutput):
    """Output of :class:`AdaptiveComputationTime`.

    Attributes:
        ponder_cost: ρ = Σ_t (N(t) + R(t)) per sample, (B,); differentiable through R in train mode.
        remainder: R(t) per sample and input step, (B, T).
        steps_per_input: N(t) per sample and input step, (B, T) int64 (``decisions["steps"]`` is their sum).
    """

    ponder_cost: torch.Tensor | None = None
    remainder: torch.Tensor | None = None
    steps_per_input: torch.Tensor | None = None


def act_halting(h: torch.Tensor, *, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ACT's halting step, remainder and halting distribution from the halting probabilities.

    Args:
        h: (B, M-1) halting probabilities h^1..h^{M-1} (the unit is not evaluated at step M, where pondering
            stops regardless); ``M = 1`` is a (B, 0) tensor.
        threshold: 1 - ε; ``inf`` never halts before M.

    Returns:
        ``(N, R, p)``: halting step (B,) int64 in 1..M, remainder (B,) = 1 - Σ_{n<N} h^n, and (B, M) weights with
        p^n = h^n for n < N, p^N = R, 0 after N. Sums run left to right, as in the compact (execute) path.
    """
    b, k = h.shape
    hsum = h.new_zeros(b)
    active = torch.ones(b, dtype=torch.bool, device=h.device)
    steps = torch.full((b,), k + 1, dtype=torch.long, device=h.device)
    rem = h.new_zeros(b)
    weights = []
    for n in range(k):
        hn = h[:, n]
        stop = active & (hsum + hn >= threshold)
        weights.append(torch.where(stop, 1.0 - hsum, torch.where(active, hn, torch.zeros_like(hn))))
        steps = torch.where(stop, torch.full_like(steps, n + 1), steps)
        rem = torch.where(stop, 1.0 - hsum, rem)
        hsum = torch.where(active & ~stop, hsum + hn, hsum)
        active = active & ~stop
    weights.append(torch.where(active, 1.0 - hsum, torch.zeros_like(hsum)))
    rem = torch.where(active, 1.0 - hsum, rem)
    return steps, rem, torch.stack(weights, 1)


class AdaptiveComputationTime(PonderingModel):
    """ACT around a ponder body (see the module docstring).

    Args:
        body: the step function (``RecurrentBody`` or ``ResidualBody``).
        max_steps: M, the most ponder steps per input step.
        eps: ε; pondering stops once the halting sum reaches 1 - ε (the knob :func:`calibrate_act_eps` fits).
        tau: τ, weight of the ponder cost in ``aux_losses["ponder"]``.
    """

    def __init__(self, body: PonderBody, *, max_steps: int = 20, eps: float = 0.01, tau: float = 1e-3) -> None:
        super().__init__(body, max_steps=max_steps)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1), got {eps}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.eps = float(eps)
        self.tau = float(tau)

    @property
    def threshold(self) -> float:
        return math.inf if self._all_on else 1.0 - self.eps

    # ------------------------------------------------------------------ one input step, two implementations
    def _ponder_compact(self, x_t: torch.Tensor | None, s: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Execute/train: only samples still pondering run the next step. Returns (mean state, N, R)."""
        body, m, thr = self.body, self.max_steps, self.threshold
        b, dev = s.shape[0], s.device
        idx = torch.arange(b, device=dev)  # original rows of the compact sub-batch
        cur, xa = s, x_t
        hsum = s.new_zeros(b)
        acc = torch.zeros_like(s)
        # (original rows, mean states, remainders, N) of the samples that halted, scattered back once at the end.
        finished: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        for n in range(1, m + 1):
            cur = body.step(xa, cur, first=n == 1)
            stop: torch.Tensor | None = None
            if n < m:
                h = torch.sigmoid(body.halting(cur))
                new = hsum + h
                stop = new >= thr
                if not bool(stop.any()):  # nobody halts: p = h for every row
                    acc = acc + _bcast(h, cur) * cur
                    hsum = new
                    continue
                p = torch.where(stop, 1.0 - hsum, h)
            else:
                p = 1.0 - hsum
            acc = acc + _bcast(p, cur) * cur
            if stop is None or bool(stop.all()):
                finished.append((idx, acc, 1.0 - hsum, n))
                break
            # The samples that halt leave the sub-batch; the rest run the next step.
            done, keep = rows_where(stop), rows_where(~stop)
            finished.append((idx.index_select(0, done), acc.index_select(0, done),
                             (1.0 - hsum).index_select(0, done), n))
            idx, cur, acc = idx.index_select(0, keep), cur.index_select(0, keep), acc.index_select(0, keep)
            hsum = new.index_select(0, keep)
            xa = xa.index_select(0, keep) if xa is not None else None
        if len(finished) == 1:  # everyone halted at the same step: rows are still in input order
            rows, acc, rem, n = finished[0]
            return acc, torch.full((b,), n, dtype=torch.long, device=dev), rem
        rows = torch.cat([f[0] for f in finished])
        out = torch.zeros_like(s).index_copy(0, rows, torch.cat([f[1] for f in finished]))
        rem = s.new_zeros(b).index_copy(0, rows, torch.cat([f[2] for f in finished]))
        steps = torch.empty(b, dtype=torch.long, device=dev).index_copy_(
            0, rows, torch.cat([torch.full((f[0].numel(),), f[3], dtype=torch.long, device=dev) for f in finished]))
        return out, steps, rem

    def _ponder_masked(self, x_t: torch.Tensor | None, s: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Simulate: all M steps for every sample, then ACT's weights as masks. Returns (mean state, N, R)."""
        body, m = self.body, self.max_steps
        states, hs = [], []
        cur = s
        for n in range(1, m + 1):
            cur = body.step(x_t, cur, first=n == 1)
            states.append(cur)
            if n < m:
                hs.append(torch.sigmoid(body.halting(cur)))
        h = torch.stack(hs, 1) if hs else s.new_zeros(s.shape[0], 0)
        steps, rem, p = act_halting(h, threshold=self.threshold)
        acc = torch.zeros_like(s)
        for n, sn in enumerate(states):
            # where(), not a product with 0: states after halting are never read (they may even overflow).
            ran = _bcast(n < steps, sn)
            acc = torch.where(ran, acc + _bcast(p[:, n], sn) * sn, acc)
        return acc, steps, rem

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> ACTOutput:
        x = self._check(x)
        mode = resolve_mode(self, mode)
        c, m = self.body.costs, self.max_steps
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        inputs, s = self.body.encode(x)
        ledger.charge(c.encode, part="encode")
        all_steps, all_rem = [], []
        for x_t in inputs:
            if mode is Mode.SIMULATE:
                s, steps, rem = self._ponder_masked(x_t, s)
            else:
                s, steps, rem = self._ponder_compact(x_t, s)
            all_steps.append(steps)
            all_rem.append(rem)
        logits = self.body.readout(s)
        steps_t, rem_t = torch.stack(all_steps, 1), torch.stack(all_rem, 1)
        # What each sample ran: N(t) steps and min(N(t), M-1) halting units per input step (one tensor op for the
        # whole batch rather than a ledger update per ponder step, which costs as much as a small step).
        n = steps_t.to(torch.float64)
        ledger.charge((n * c.step + n.clamp(max=m - 1) * c.halting).sum(1), part="ponder")
        ledger.charge(c.readout, part="readout")
        ponder = (steps_t.to(rem_t.dtype) + rem_t).sum(1)
        return ACTOutput(logits=logits, cost=ledger.flops, decisions={"steps": steps_t.sum(1)}, mode=mode,
                         aux_losses={"ponder": self.tau * ponder.mean()}, ponder_cost=ponder, remainder=rem_t,
                         steps_per_input=steps_t)

    def to_static(self) -> ACTUnrolled:
        """The network unrolled for M steps per input step, weighted as ACT weighs it when nothing halts."""
        return ACTUnrolled(self.body, max_steps=self.max_steps)


class ACTUnrolled(nn.Module):
    """Static twin of :class:`AdaptiveComputationTime`: M steps per input step, halting units on steps 1..M-1,
    state = Σ_{n<M} h^n s^n + (1 - Σ_{n<M} h^n) s^M (ACT's weighting when the halting sum never reaches
    1 - ε). Shares the body's modules (same weights)."""

    def __init__(self, body: PonderBody, *, max_steps: int) -> None:
        super().__init__()
        self.body = body
        self.max_steps = max_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, s = self.body.encode(x)
        for x_t in inputs:
            cur, acc, hsum = s, torch.zeros_like(s), s.new_zeros(s.shape[0])
            for n in range(1, self.max_steps + 1):
                cur = self.body.step(x_t, cur, first=n == 1)
                if n < self.max_steps:
                    h = torch.sigmoid(self.body.halting(cur))
                    acc = acc + _bcast(h, cur) * cur
                    hsum = hsum + h
                else:
                    acc = acc + _bcast(1.0 - hsum, cur) * cur
            s = acc
        return self.body.readout(s)


def calibrate_act_eps(model: AdaptiveComputationTime, x: torch.Tensor, *, budget: float,
                      unit: Literal["fraction", "flops", "steps"] = "fraction", batch_size: int = 512,
                      lo: float = 1e-4, hi: float = 0.999) -> KnobCalibration:
    """Fit ACT's ε on validation inputs ``x`` so that the mean execute cost meets ``budget``.

    ``unit``: ``fraction`` of the full (M-step) cost, ``flops`` per sample, or mean ponder ``steps`` per sample.
    A larger ε halts earlier. Raises ``ValueError`` (model unchanged) if the budget is out of reach.
    """
    return calibrate_halting_attr(model, x, attr="eps", budget=budget, unit=unit, lo=lo, hi=hi,
                                  batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- registry
@register_model
def act_rnn_parity(*, n_bits: int = 16, hidden_size: int = 128, max_steps: int = 20, eps: float = 0.01,
                   tau: float = 1e-3, cell: Literal["rnn", "gru"] = "rnn") -> AdaptiveComputationTime:
    """ACT's parity network: one input vector of ``n_bits`` entries in {-1, 0, 1}, a tanh RNN with the
    first-step flag, 2 classes (even/odd). ``max_steps=1`` is the same network without ACT."""
    body = RecurrentBody(input_size=n_bits, seq_len=None, hidden_size=hidden_size, num_classes=2, cell=cell)
    return AdaptiveComputationTime(body, max_steps=max_steps, eps=eps, tau=tau)


@register_model
def act_rnn(*, input_size: int, seq_len: int, num_classes: int, hidden_size: int = 128, max_steps: int = 20,
            eps: float = 0.01, tau: float = 1e-3, cell: Literal["rnn", "gru"] = "rnn") -> AdaptiveComputationTime:
    """ACT on a sequence classifier: (B, seq_len, input_size) inputs, pondering at every input step."""
    body = RecurrentBody(input_size=input_size, seq_len=seq_len, hidden_size=hidden_size, num_classes=num_classes,
                         cell=cell)
    return AdaptiveComputationTime(body, max_steps=max_steps, eps=eps, tau=tau)


@register_model
def act_shared_resblock(*, in_chans: int = 1, input_size: int = 28, width: int = 32, num_classes: int = 10,
                        max_steps: int = 8, eps: float = 0.01, tau: float = 1e-3) -> AdaptiveComputationTime:
    """ACT over one weight-shared residual block applied repeatedly to image features (e.g. MNIST 28×28)."""
    body = ResidualBody(in_chans=in_chans, input_size=input_size, width=width, num_classes=num_classes)
    return AdaptiveComputationTime(body, max_steps=max_steps, eps=eps, tau=tau)


@register_model
def test_act_rnn() -> AdaptiveComputationTime:
    """Tiny ACT RNN on 3-step sequences of 5 features (contract tests); halting sums spread across samples."""
    with seeded_init(0):
        body = RecurrentBody(input_size=5, seq_len=3, hidden_size=12, num_classes=3, halt_bias=-0.5,
                             halt_init_std=1.0)
    return AdaptiveComputationTime(body, max_steps=5, eps=0.01)


@register_model
def test_act_resblock() -> AdaptiveComputationTime:
    """Tiny ACT over a shared residual block on 1×8×8 images (contract tests)."""
    with seeded_init(0):
        body = ResidualBody(in_chans=1, input_size=8, width=4, num_classes=3, halt_bias=2.0, halt_init_std=3.0)
    return AdaptiveComputationTime(body, max_steps=4, eps=0.01)
