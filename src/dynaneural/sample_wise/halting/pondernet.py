"""PonderNet: a probabilistic halting step, trained by the expected loss over halting steps and a KL prior.

Paper: A. Banino, J. Balaguer, C. Blundell, "PonderNet: Learning to Ponder", ICML 2021 Workshop on Automated
Machine Learning, arXiv:2107.05407.

The step function ``h_{n} = s(x, h_{n-1})`` gives, after every step, a prediction ``ŷ_n`` and a conditional
halting probability ``λ_n = σ(w·h_n + b)`` ("halt now, given that we have not halted yet"). The unconditional
probability of halting at step n is

    p_n = λ_n Π_{j<n} (1 - λ_j),   with λ_N = 1 at the last step N so that Σ p = 1.

Training minimises ``L = Σ_n p_n L(y, ŷ_n) + β KL(p ‖ p_G(λ_p))``: the reconstruction loss is the *expectation*
of the task loss over the halting step (:class:`PonderNetLoss`, which needs the labels), and the KL pulls the
halting distribution towards a geometric prior ``p_G(n) = λ_p (1-λ_p)^{n-1}``, truncated to N steps and
renormalised (``aux_losses["kl"]``, weighted by β). At inference the halting step is *sampled*: after step n the
sample stops with probability λ_n (``halting="sample"``; the uniforms are drawn from a generator seeded with
``sample_seed`` at every forward, so simulate and execute draw the same). The deterministic alternative
(``halting="threshold"``, the default) stops at the first step where the cumulative halting probability
``P(n* ≤ n) = 1 - Π_{j≤n} (1 - λ_j)`` reaches ``threshold`` (0.5: the median halting step); that threshold is
the knob :func:`calibrate_pondernet_threshold` fits to a compute budget.

The prediction is ``ŷ_{n*}`` of the halting step. In ``execute`` mode the samples that halt leave the compact
sub-batch and only they are read out; ``simulate`` runs N steps and a readout per step for every sample and
selects; ``train`` runs N steps for every sample (the loss needs every ``ŷ_n``) and reports as ``logits`` the
mixture ``log Σ_n p_n softmax(ŷ_n)``. The ledger charges the stem, n* steps, min(n*, N-1) halting units and one
readout. Inside ``all_on()`` nothing halts and no halting unit runs: the static twin is the network unrolled for
N steps and read out at the last one (``ŷ_N``, the prediction when the model never halts early).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
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
    calibrate_halting_attr,
    seeded_init,
)

__all__ = ["PonderNet", "PonderNetLoss", "PonderNetOutput", "PonderUnrolled", "calibrate_pondernet_threshold",
           "geometric_prior", "halting_distribution", "kl_to_geometric"]


def halting_distribution(halt_logits: torch.Tensor) -> torch.Tensor:
    """log p_n of halting at step n, (B, N), from the (B, N-1) halting logits of steps 1..N-1 (λ_N = 1).

    Computed in log space (``log λ = logsigmoid(z)``, ``log(1-λ) = logsigmoid(-z)``) so that long runs of small
    λ do not underflow.
    """
    log_halt = F.logsigmoid(halt_logits)
    log_cont = F.logsigmoid(-halt_logits)
    # Survival before step n: Σ_{j<n} log(1 - λ_j), with 0 before step 1.
    survive = torch.cat([halt_logits.new_zeros(halt_logits.shape[0], 1), log_cont.cumsum(1)], 1)
    return survive + torch.cat([log_halt, halt_logits.new_zeros(halt_logits.shape[0], 1)], 1)


def geometric_prior(lambda_p: float, max_steps: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The geometric prior p_G(n) = λ_p (1-λ_p)^{n-1}, n = 1..N, truncated to N steps and renormalised, (N,)."""
    if not 0.0 < lambda_p <= 1.0:
        raise ValueError(f"lambda_p must lie in (0, 1], got {lambda_p}")
    n = torch.arange(max_steps, dtype=torch.float64)
    p = lambda_p * (1.0 - lambda_p) ** n
    return (p / p.sum()).to(dtype=dtype, device=device)


def kl_to_geometric(log_p: torch.Tensor, lambda_p: float) -> torch.Tensor:
    """Batch-mean KL(p ‖ p_G) = Σ_n p_n (log p_n - log p_G(n)) of halting distributions given as log p, (B, N)."""
    prior = geometric_prior(lambda_p, log_p.shape[1], dtype=log_p.dtype, device=log_p.device)
    return (log_p.exp() * (log_p - prior.log())).sum(1).mean()


@dataclass
class PonderNetOutput(DynamicOutput):
    """Output of :class:`PonderNet`.

    Attributes:
        step_logits: ŷ_n of every step, (B, N, C); train and simulate mode (None in execute mode).
        log_halt_probs: log p_n, (B, N); train mode (and simulate mode, detached by inference mode).
    """

    step_logits: torch.Tensor | None = None
    log_halt_probs: torch.Tensor | None = None


class PonderNetLoss(nn.Module):
    """PonderNet's reconstruction loss ``Σ_n p_n CE(ŷ_n, y)`` (batch mean) for the training loop's ``loss_fn``.

    The KL term is already in ``out.aux_losses["kl"]`` (the training loop adds it). Outside train mode, where no
    halting distribution is computed, it falls back to the cross-entropy of ``out.logits``.
    """

    def forward(self, out: PonderNetOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if out.step_logits is None or out.log_halt_probs is None:
            return {"loss": F.cross_entropy(out.logits, y)}
        b, n, c = out.step_logits.shape
        ce = F.cross_entropy(out.step_logits.reshape(b * n, c), y.repeat_interleave(n), reduction="none")
        rec = (out.log_halt_probs.exp() * ce.view(b, n)).sum(1).mean()
        correct = (out.logits.argmax(1) == y).sum()
        return {"loss": rec, "reconstruction": rec.detach(), "correct/final": correct}


class PonderNet(PonderingModel):
    """PonderNet around a ponder body with a single input step (see the module docstring).

    Args:
        body: the step function (``RecurrentBody`` with vector input, or ``ResidualBody``).
        max_steps: N, the most ponder steps.
        beta: β, weight of the KL term.
        lambda_p: λ_p of the geometric prior (its mean is 1/λ_p steps).
        halting: inference rule, ``"threshold"`` (deterministic) or ``"sample"`` (the paper's).
        threshold: cumulative halting probability at which ``"threshold"`` stops, in (0, 1).
        sample_seed: seed of the uniforms ``"sample"`` draws at every forward.
    """

    def __init__(self, body: PonderBody, *, max_steps: int = 20, beta: float = 0.01, lambda_p: float = 0.2,
                 halting: Literal["threshold", "sample"] = "threshold", threshold: float = 0.5,
                 sample_seed: int = 0) -> None:
        super().__init__(body, max_steps=max_steps)
        if body.seq_len != 1:
            raise ValueError(f"PonderNet ponders on one input; the body takes {body.seq_len} input steps")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        geometric_prior(lambda_p, 1)  # validates lambda_p
        if halting not in ("threshold", "sample"):
            raise ValueError(f"halting must be 'threshold' or 'sample', got {halting!r}")
        self.beta, self.lambda_p, self.halting, self.sample_seed = float(beta), float(lambda_p), halting, sample_seed
        self.threshold = float(threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")

    def full_cost(self) -> float:
        """FLOPs per sample of the static twin (N steps, one readout, no halting unit)."""
        c = self.body.costs
        return c.encode + self.max_steps * c.step + c.readout

    def _uniforms(self, b: int, device: torch.device) -> torch.Tensor | None:
        if self.halting != "sample" or self.max_steps == 1:
            return None
        g = torch.Generator().manual_seed(self.sample_seed)
        return torch.rand(b, self.max_steps - 1, generator=g).to(device)

    def _stop(self, lam: torch.Tensor, surv: torch.Tensor, u: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(halt after this step?, Π_{j≤n} (1 - λ_j)) from ``surv`` = Π_{j<n} (1 - λ_j); ``u``: this step's
        uniforms when sampling. The threshold rule is P(n* ≤ n) = 1 - Π_{j≤n} (1 - λ_j) ≥ q."""
        new = surv * (1.0 - lam)
        if u is not None:
            return u < lam, new
        return new <= 1.0 - self.threshold, new

    def _compact(self, x_t: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Execute: the samples that halt leave the sub-batch and are read out. Returns (logits, n*)."""
        body, m = self.body, self.max_steps
        b, dev = s.shape[0], s.device
        u = self._uniforms(b, dev)
        idx = torch.arange(b, device=dev)
        cur, xa, surv = s, x_t, s.new_ones(b)
        finished: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (original rows, logits, n*)
        for n in range(1, m + 1):
            cur = body.step(xa, cur, first=n == 1)
            if n == m:
                finished.append((idx, body.readout(cur), n))
                break
            if self._all_on:
                continue
            lam = torch.sigmoid(body.halting(cur))
            stop, surv = self._stop(lam, surv, None if u is None else u.index_select(0, idx)[:, n - 1])
            if not bool(stop.any()):
                continue
            if bool(stop.all()):
                finished.append((idx, body.readout(cur), n))
                break
            done, keep = rows_where(stop), rows_where(~stop)
            finished.append((idx.index_select(0, done), body.readout(cur.index_select(0, done)), n))
            idx, cur, surv = idx.index_select(0, keep), cur.index_select(0, keep), surv.index_select(0, keep)
            xa = xa.index_select(0, keep) if xa is not None else None
        if len(finished) == 1:  # everyone halted at the same step: rows are still in input order
            return finished[0][1], torch.full((b,), finished[0][2], dtype=torch.long, device=dev)
        rows = torch.cat([f[0] for f in finished])
        logits = s.new_zeros(b, self.num_classes).index_copy(0, rows, torch.cat([f[1] for f in finished]))
        steps = torch.empty(b, dtype=torch.long, device=dev).index_copy_(
            0, rows, torch.cat([torch.full((f[0].numel(),), f[2], dtype=torch.long, device=dev) for f in finished]))
        return logits, steps

    def _all_steps(self, x_t: torch.Tensor | None, s: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Train/simulate: N steps for every sample. Returns (step logits (B, N, C), halting logits (B, N-1) or
        None inside all_on, halting step n* by the inference rule)."""
        body, m = self.body, self.max_steps
        cur, outs, zs = s, [], []
        for n in range(1, m + 1):
            cur = body.step(x_t, cur, first=n == 1)
            outs.append(body.readout(cur))
            if n < m and not self._all_on:
                zs.append(body.halting(cur))
        b = s.shape[0]
        steps = torch.full((b,), m, dtype=torch.long, device=s.device)
        z = torch.stack(zs, 1) if zs else None
        if z is not None:
            u = self._uniforms(b, s.device)
            surv, active = s.new_ones(b), torch.ones(b, dtype=torch.bool, device=s.device)
            for n in range(m - 1):
                lam = torch.sigmoid(z[:, n].detach())
                stop, surv = self._stop(lam, surv, None if u is None else u[:, n])
                stop = active & stop
                steps = torch.where(stop, torch.full_like(steps, n + 1), steps)
                active = active & ~stop
        return torch.stack(outs, 1), z, steps

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> PonderNetOutput:
        x = self._check(x)
        mode = resolve_mode(self, mode)
        c, m, b = self.body.costs, self.max_steps, x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        inputs, s = self.body.encode(x)
        ledger.charge(c.encode, part="encode")
        step_logits = z = log_p = None
        if mode is Mode.EXECUTE:
            logits, steps = self._compact(inputs[0], s)
        else:
            step_logits, z, steps = self._all_steps(inputs[0], s)
        # What each sample ran: n* steps, min(n*, N-1) halting units (none inside all_on()), one readout.
        n = steps.to(torch.float64)
        halts = torch.zeros_like(n) if self._all_on else n.clamp(max=m - 1)
        ledger.charge(n * c.step + halts * c.halting + c.readout, part="ponder")
        if mode is Mode.EXECUTE:
            return PonderNetOutput(logits=logits, cost=ledger.flops, decisions={"steps": steps}, mode=mode)
        assert step_logits is not None
        aux: dict[str, torch.Tensor] = {}
        if z is not None:
            log_p = halting_distribution(z)
            aux["kl"] = self.beta * kl_to_geometric(log_p, self.lambda_p)
        if mode is Mode.TRAIN:
            if log_p is None:
                logits = step_logits[:, -1]
            else:  # the mixture over halting steps: log Σ_n p_n softmax(ŷ_n)
                logits = torch.logsumexp(log_p.unsqueeze(2) + F.log_softmax(step_logits, 2), 1)
        else:
            logits = step_logits[torch.arange(b, device=x.device), steps - 1]
        return PonderNetOutput(logits=logits, cost=ledger.flops, decisions={"steps": steps}, mode=mode,
                               aux_losses=aux, step_logits=step_logits, log_halt_probs=log_p)

    def to_static(self) -> PonderUnrolled:
        """The network unrolled for N steps and read out at the last (what runs when nothing halts)."""
        return PonderUnrolled(self.body, max_steps=self.max_steps)


class PonderUnrolled(nn.Module):
    """Static twin of :class:`PonderNet`: N steps, readout of the last state. Shares the body's modules."""

    def __init__(self, body: PonderBody, *, max_steps: int) -> None:
        super().__init__()
        self.body = body
        self.max_steps = max_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, s = self.body.encode(x)
        for n in range(1, self.max_steps + 1):
            s = self.body.step(inputs[0], s, first=n == 1)
        return self.body.readout(s)


def calibrate_pondernet_threshold(model: PonderNet, x: torch.Tensor, *, budget: float,
                                  unit: Literal["fraction", "flops", "steps"] = "fraction", batch_size: int = 512,
                                  lo: float = 1e-3, hi: float = 1.0 - 1e-6) -> KnobCalibration:
    """Fit the cumulative-probability threshold of ``halting="threshold"`` on validation inputs ``x`` so that the
    mean execute cost meets ``budget`` (``fraction`` of the static twin's FLOPs, ``flops``, or mean ``steps``).

    Switches the model to ``halting="threshold"``. Raises ``ValueError`` (model unchanged) if out of reach.
    """
    before_rule = model.halting
    model.halting = "threshold"
    try:
        return calibrate_halting_attr(model, x, attr="threshold", budget=budget, unit=unit, lo=lo, hi=hi,
                                      batch_size=batch_size)
    except ValueError:
        model.halting = before_rule
        raise


# ---------------------------------------------------------------------------------------------- registry
@register_model
def pondernet_parity(*, n_bits: int = 16, hidden_size: int = 128, max_steps: int = 20, beta: float = 0.01,
                     lambda_p: float = 0.2, halting: Literal["threshold", "sample"] = "threshold",
                     threshold: float = 0.5, cell: Literal["rnn", "gru"] = "gru") -> PonderNet:
    """PonderNet's parity network: one vector of ``n_bits`` entries in {-1, 0, 1}, a GRU step, 2 classes."""
    body = RecurrentBody(input_size=n_bits, seq_len=None, hidden_size=hidden_size, num_classes=2, cell=cell,
                         first_step_flag=False, halt_bias=0.0)
    return PonderNet(body, max_steps=max_steps, beta=beta, lambda_p=lambda_p, halting=halting, threshold=threshold)


@register_model
def pondernet_shared_resblock(*, in_chans: int = 1, input_size: int = 28, width: int = 32, num_classes: int = 10,
                              max_steps: int = 8, beta: float = 0.01, lambda_p: float = 0.3,
                              halting: Literal["threshold", "sample"] = "threshold",
                              threshold: float = 0.5) -> PonderNet:
    """PonderNet over one weight-shared residual block applied repeatedly to image features."""
    body = ResidualBody(in_chans=in_chans, input_size=input_size, width=width, num_classes=num_classes,
                        halt_bias=0.0)
    return PonderNet(body, max_steps=max_steps, beta=beta, lambda_p=lambda_p, halting=halting, threshold=threshold)


@register_model
def test_pondernet_rnn() -> PonderNet:
    """Tiny PonderNet GRU on 6-feature vectors (contract tests); halting steps spread across samples."""
    with seeded_init(0):
        body = RecurrentBody(input_size=6, seq_len=None, hidden_size=12, num_classes=3, cell="gru",
                             first_step_flag=False, halt_bias=-1.0, halt_init_std=1.5)
    return PonderNet(body, max_steps=5)


@register_model
def test_pondernet_resblock() -> PonderNet:
    """Tiny PonderNet over a shared residual block on 1×8×8 images (contract tests)."""
    with seeded_init(0):
        body = ResidualBody(in_chans=1, input_size=8, width=4, num_classes=3, halt_bias=1.0, halt_init_std=3.0)
    return PonderNet(body, max_steps=4)

