"""Skim-RNN: per token, either a full LSTM update or a *partial* update of only the first d units of the state.

Paper: M. Seo, S. Min, A. Farhadi, H. Hajishirzi, "Neural Speed Reading via Skim-RNN", ICLR 2018,
arXiv:1711.02085.

At every step a two-way policy reads ``[x_t, h_{t-1}]`` and chooses *read* (the big LSTM updates all ``H`` units)
or *skim* (a small LSTM cell of ``d ≪ H`` units, fed the full previous state, updates units ``[0, d)`` of ``h`` and
``c``; units ``[d, H)`` are copied). Training relaxes the choice with straight-through Gumbel-softmax
(:func:`~dynaneural.policies.categorical_decision`) and a :class:`~dynaneural.policies.BudgetLoss` on the
probability of a full read; at inference a sample skims when ``P(skim) ≥ threshold`` (the knob).

``execute`` computes the policy for every sample (it must see each token: 2·(F+H) MACs), then runs the big cell
on the rows that read and the small cell on the rows that skim, each as one compact sub-batch — the skimmed rows
never pay for the big cell, and units ``[d, H)`` are never touched for them. Ledger parts: ``policy``, ``big``,
``small``, ``head``; ``all_on()`` reads every token with the big cell (the fused ``nn.LSTM``, the static twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import BudgetLoss, TemperatureSchedule, categorical_decision
from dynaneural.registry import register_model
from dynaneural.temporal_wise.sequence.common import (
    RecurrentBackbone,
    SequenceModel,
    check_sequence_batch,
)

__all__ = ["SkimRNN", "SkimRNNConfig"]


@dataclass(frozen=True)
class SkimRNNConfig:
    """Args:
    hidden_size: H, big cell. small_size: d, units a skim updates. num_classes, vocab_size, embed_dim,
    input_size, max_len: as for the other sequence models. threshold: P(skim) needed to skim (inference knob).
    budget: target fraction of full reads (BudgetLoss), None for none. budget_weight: its weight.
    tau_start, tau_end: Gumbel temperature schedule (exponential).
    """

    hidden_size: int = 128
    small_size: int = 16
    num_classes: int = 2
    vocab_size: int | None = None
    embed_dim: int = 64
    input_size: int | None = None
    max_len: int = 48
    threshold: float = 0.5
    budget: float | None = 0.4
    budget_weight: float = 1.0
    tau_start: float = 1.0
    tau_end: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.small_size < self.hidden_size:
            raise ValueError(f"small_size must lie in [1, hidden_size), got {self.small_size}")


class SkimRNN(SequenceModel):
    """Skim-LSTM classifier; ``decisions["updates"]`` (B, T) bool is True where the big cell read the token."""

    def __init__(self, cfg: SkimRNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = RecurrentBackbone(cell="lstm", hidden_size=cfg.hidden_size, num_classes=cfg.num_classes,
                                          vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                                          input_size=cfg.input_size)
        fin, hid, d = self.backbone.feature_size, cfg.hidden_size, cfg.small_size
        # the small cell: gates (4d) from [x_t, h_{t-1}] (the full previous state, as in the paper)
        self.small = nn.Linear(fin + hid, 4 * d)
        bound = 1.0 / math.sqrt(d)
        nn.init.uniform_(self.small.weight, -bound, bound)
        nn.init.uniform_(self.small.bias, -bound, bound)
        self.policy = nn.Linear(fin + hid, 2)  # logits of (read, skim)
        self.budget_loss = BudgetLoss(target=cfg.budget, weight=cfg.budget_weight) if cfg.budget else None
        self.tau = TemperatureSchedule(cfg.tau_start, cfg.tau_end, "exponential")
        self._progress = 0.0
        self.threshold = float(cfg.threshold)
        self.num_classes = cfg.num_classes
        self._init_sequence_io(vocab_size=cfg.vocab_size, input_size=cfg.input_size, max_len=cfg.max_len)

    def set_train_progress(self, progress: float) -> None:
        self._progress = float(progress)

    def set_threshold(self, threshold: float) -> None:
        self.threshold = float(threshold)

    @property
    def small_flops(self) -> int:
        return self.small.in_features * self.small.out_features

    @property
    def policy_flops(self) -> int:
        return self.policy.in_features * self.policy.out_features

    def _small_step(self, xh: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Small cell on [x, h] (n, F+H) and the first d units of c: new (h[:, :d], c[:, :d])."""
        i, f, g, o = self.small(xh).chunk(4, 1)
        cs = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cs), cs

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        x = check_sequence_batch(self, x)
        bb, d = self.backbone, self.config.small_size
        b, steps = x.shape[:2]
        aux: dict[str, torch.Tensor] = {}
        if self._all_on:
            _, (h, _) = bb.run_fused(bb.features(x))
            updates = torch.ones(b, steps, dtype=torch.bool, device=x.device)
        else:
            feats = bb.features(x)
            h, c = bb.zero_state(b, feats)
            ups, probs = [], []
            training = mode is Mode.TRAIN
            for t in range(steps):
                xt = feats[:, t]
                xh = torch.cat([xt, h], 1)
                logits = self.policy(xh)
                if training:
                    dec = categorical_decision(logits, training=True, relaxation="gumbel", tau=self.tau(self._progress))
                    big = dec.hard == 0
                    hb, cb = bb.step(xt, (h, c))
                    hs, cs = self._small_step(xh, c[:, :d])
                    hs = torch.cat([hs, h[:, d:]], 1)
                    cs = torch.cat([cs, c[:, d:]], 1)
                    v = dec.value  # (B, 2) straight-through one-hot
                    h = v[:, :1] * hb + v[:, 1:] * hs
                    c = v[:, :1] * cb + v[:, 1:] * cs
                    probs.append(dec.prob[:, 0])
                else:
                    big = torch.softmax(logits, -1)[:, 1] < self.threshold
                    if mode is Mode.SIMULATE:  # both cells on the full batch, then pick
                        hb, cb = bb.step(xt, (h, c))
                        hs, cs = self._small_step(xh, c[:, :d])
                        m = big.unsqueeze(1)
                        h = torch.where(m, hb, torch.cat([hs, h[:, d:]], 1))
                        c = torch.where(m, cb, torch.cat([cs, c[:, d:]], 1))
                    else:  # execute: each cell on its own rows only
                        rb, rs = big.nonzero().squeeze(1), (~big).nonzero().squeeze(1)
                        if rb.numel():
                            hb, cb = bb.step(xt.index_select(0, rb), (h.index_select(0, rb), c.index_select(0, rb)))
                            h.index_copy_(0, rb, hb)
                            c.index_copy_(0, rb, cb)
                        if rs.numel():
                            hs, cs = self._small_step(xh.index_select(0, rs), c[:, :d].index_select(0, rs))
                            h[:, :d].index_copy_(0, rs, hs)  # units [d, H) of skimming rows are never touched
                            c[:, :d].index_copy_(0, rs, cs)
                ups.append(big)
            updates = torch.stack(ups, 1)
            if training and self.budget_loss is not None:
                aux["budget"] = self.budget_loss(torch.stack(probs, 1).mean(1))
        ledger = CostLedger.zeros(b, device=x.device, track_parts=True)
        n_big = updates.sum(1).to(torch.float64)
        ledger.charge(n_big * bb.step_flops, part="big")
        if not self._all_on:
            ledger.charge((steps - n_big) * self.small_flops, part="small")
            ledger.charge(float(steps * self.policy_flops), part="policy")
        ledger.charge(float(bb.head_flops), part="head")
        return DynamicOutput(logits=bb.head(h), cost=ledger.flops, decisions={"updates": updates}, mode=mode,
                             aux_losses=aux, cost_by_part=ledger.by_part)


def _build(defaults: dict, overrides: dict) -> SkimRNN:
    return SkimRNN(SkimRNNConfig(**{**defaults, **overrides}))


@register_model
def skim_lstm_sst2(*, vocab_size: int = 16384, hidden_size: int = 128, small_size: int = 16, embed_dim: int = 128,
                   max_len: int = 48, threshold: float = 0.5, budget: float | None = 0.4,
                   budget_weight: float = 1.0) -> SkimRNN:
    """Skim-LSTM over SST-2 token ids."""
    return _build(dict(num_classes=2), dict(vocab_size=vocab_size, hidden_size=hidden_size, small_size=small_size,
                                            embed_dim=embed_dim, max_len=max_len, threshold=threshold,
                                            budget=budget, budget_weight=budget_weight))


@register_model
def skim_lstm(*, input_size: int = 128, hidden_size: int = 512, small_size: int = 32, num_classes: int = 10,
              max_len: int = 100, threshold: float = 0.5) -> SkimRNN:
    """Skim-LSTM over float feature sequences (B, T, input_size)."""
    return _build({}, dict(input_size=input_size, hidden_size=hidden_size, small_size=small_size,
                           num_classes=num_classes, max_len=max_len, threshold=threshold))


@register_model
def test_skim_lstm() -> SkimRNN:
    """Tiny Skim-LSTM on float features; policy weights scaled so about half the steps skim."""
    m = _build({}, dict(input_size=6, hidden_size=16, small_size=4, num_classes=3, max_len=10))
    with torch.no_grad():
        m.policy.weight.mul_(4.0)
    return m
