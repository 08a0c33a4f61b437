"""Skip RNN: learning to skip state updates in recurrent networks (LSTM and GRU cells).

Paper: V. Campos, B. Jou, X. Giró-i-Nieto, J. Torres, S.-F. Chang, "Skip RNN: Learning to Skip State Updates in
Recurrent Neural Networks", ICLR 2018, arXiv:1708.06834.

The cell carries an *accumulated update probability* ``ũ``. With ``u_t = round(ũ_t)`` (Eq. 2–5 of the paper)::

    s_t      = u_t · S(s_{t-1}, x_t) + (1 − u_t) · s_{t-1}
    Δũ_t     = σ(w_p · s_t + b_p)
    ũ_{t+1}  = u_t · Δũ_t + (1 − u_t) · (ũ_t + min(Δũ_t, 1 − ũ_t))

and ``ũ_1 = 1`` (the first step always updates). The state is frozen while skipping, so ``Δũ`` is the one of the
last update, and ``k`` steps after an update at probability ``p`` the accumulator is ``min(k·p, 1)``: the next
update comes exactly ``K(p) = ceil(θ / p)`` steps later (``θ = 0.5`` is the paper's rounding). We use that closed
form in every mode, which is the paper's recursion written without the running sum:

* ``train`` — every cell step is computed for every sample, ``u_t`` is straight-through (forward: the binary
  decision, backward: the gradient of ``ũ_t = min(k·p, 1)``, the paper's estimator) and a budget loss
  (:class:`~dynaneural.policies.BudgetLoss` on the mean of ``u_t``) pulls the update rate to a target;
* ``simulate`` — the reference: the cell runs on the full batch at every step, hard decisions pick the new or the
  old state (``torch.where``);
* ``execute`` — **event-driven**: the moment a sample updates, its next update step ``t + K(p)`` is scheduled, so
  nothing at all is computed for it in between (no cell, no gate, no test of the accumulator). Samples are
  independent and a skip copies the state, so the work is scheduled in *update rounds* (``schedule="rounds"``,
  the default): round r runs the r-th update of every sample that has one left, each with the input of its own
  time step, as one compact GEMM over up to the whole batch. ``schedule="steps"`` walks time instead, jumping
  from one due step to the next (``next_step.min()``) and running the rows due there. Both gather the rows, run
  one GEMM of ``[x_t, h]`` with the stacked weights (input and recurrent projections of those rows only) and
  scatter the new state back; same arithmetic per row, same results. The loop is TorchScript-compiled to cut the
  per-step interpreter overhead (``script=False`` runs it eagerly).

The public reference implementation computes the candidate state at every step and masks it: ``simulate`` here.

The threshold ``θ`` is an inference-time knob (higher θ: fewer updates), fitted to a budget by
:func:`~dynaneural.calibration.calibrate_knob`. ``all_on()`` updates at every step; its execute path is the fused
``nn.LSTM``/``nn.GRU`` itself, the static twin (:class:`~.common.StaticRecurrentClassifier`).

Per-sample cost (ledger parts): ``cell`` = updates × cell MACs, ``gate`` = gate evaluations × H (the gate is
evaluated after every update but the last step's), ``head`` = the classifier.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import resolve_mode
from dynaneural.execution import Mode
from dynaneural.layers.lstm import cat_lstm_weights, lstm_rows, onednn_linear_available, pack_linear_weight
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import BudgetLoss, straight_through
from dynaneural.registry import register_model
from dynaneural.temporal_wise.sequence.common import (
    CellKind,
    RecurrentBackbone,
    SequenceModel,
    check_sequence_batch,
)

__all__ = ["SkipRNN", "SkipRNNConfig", "SkipRNNOutput", "steps_to_next_update"]


def steps_to_next_update(p: torch.Tensor, threshold: float, limit: int) -> torch.Tensor:
    """``K(p) = ceil(θ / p)`` clamped to [1, limit]: steps from an update at probability ``p`` to the next one.

    Every mode computes the schedule with this one expression, so their decisions agree bit for bit.
    """
    return torch.ceil(threshold / p).clamp(1.0, float(limit)).long()


def _execute_rounds(x: torch.Tensor, emb: torch.Tensor | None, w_ih: torch.Tensor, w_hh: torch.Tensor,
                    b_ih: torch.Tensor, b_hh: torch.Tensor, w_g: torch.Tensor, b_g: torch.Tensor, threshold: float,
                    lstm: bool, pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip RNN over x (B, T[, F]) scheduled in *update rounds*; returns the final hidden state (B, H) and the
    updates (B, T) bool.

    Samples are independent and a skipped step copies the state, so the only order that matters is each
    sample's own sequence of updates. Round r runs the r-th update of every sample that has one left, each at
    its own time step (its input row is gathered from ``x[b, t_b]``): one GEMM over up to the whole batch per
    round instead of one over the rows due at each time step. There are as many rounds as the most-updating
    sample has updates (fewer calls than due time steps), and the rows per GEMM are front-loaded (all B in the
    first rounds). The arithmetic of each row is exactly the step-synchronous loop's.
    """
    b, steps = x.size(0), x.size(1)
    w_cat, b_cat = cat_lstm_weights(w_ih, w_hh, b_ih, b_hh, lstm)
    w_packed = pack_linear_weight(w_cat, pack and lstm)
    hidden = w_hh.size(1)
    h = torch.zeros(b, hidden, dtype=w_hh.dtype, device=w_hh.device)
    c = torch.zeros_like(h)
    updates = torch.zeros(b * steps, dtype=torch.bool, device=w_hh.device)
    x_flat = x.reshape(b * steps, -1) if x.dim() == 3 else x.reshape(b * steps)
    rows = torch.arange(b, device=w_hh.device)  # the samples with an update left, ascending
    t_rows = torch.zeros(b, dtype=torch.long, device=w_hh.device)  # the step of each one's next update
    full = True  # round 1: every sample, in order (no gather of the state needed)
    while rows.size(0) > 0:
        flat = rows * steps + t_rows
        xt = x_flat.index_select(0, flat)
        if emb is not None:
            xt = F.embedding(xt, emb)
        hr = h if full else h.index_select(0, rows)
        if lstm:
            hn, cn = lstm_rows(xt, hr, c if full else c.index_select(0, rows), w_cat, b_cat, w_packed)
            c.index_copy_(0, rows, cn)
            g = cn  # the paper's LSTM gate reads the cell state
        else:
            hn = torch.gru_cell(xt, hr, w_ih, w_hh, b_ih, b_hh)
            g = hn
        h.index_copy_(0, rows, hn)
        updates.index_fill_(0, flat, True)
        full = False
        live = (t_rows < steps - 1).nonzero().squeeze(1)  # no gate after an update at the last step
        if live.size(0) < rows.size(0):
            g, rows, t_rows = g.index_select(0, live), rows.index_select(0, live), t_rows.index_select(0, live)
        nxt = t_rows + steps_to_next_update(torch.sigmoid(torch.mv(g, w_g) + b_g), threshold, steps + 1)
        keep = (nxt < steps).nonzero().squeeze(1)
        rows, t_rows = rows.index_select(0, keep), nxt.index_select(0, keep)
    return h, updates.view(b, steps)


def _execute_loop(x: torch.Tensor, emb: torch.Tensor | None, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor, b_hh: torch.Tensor, w_g: torch.Tensor, b_g: torch.Tensor, threshold: float,
                  lstm: bool, pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Event-driven Skip RNN over x (B, T[, F]) walking time (``schedule="steps"``); returns the final hidden state
    (B, H) and updates (B, T) bool.

    Written in the TorchScript subset (it is compiled once per process by :func:`_scripted_loop`). The LSTM step
    is :func:`~dynaneural.layers.lstm.lstm_rows` on the rows due at the current step.
    """
    b, steps = x.size(0), x.size(1)
    hidden = w_hh.size(1)
    w_cat, b_cat = cat_lstm_weights(w_ih, w_hh, b_ih, b_hh, lstm)
    w_packed = pack_linear_weight(w_cat, pack and lstm)
    h = torch.zeros(b, hidden, dtype=w_hh.dtype, device=w_hh.device)
    c = torch.zeros_like(h)
    next_step = torch.zeros(b, dtype=torch.long, device=w_hh.device)
    updates = torch.zeros(b, steps, dtype=torch.bool, device=w_hh.device)
    t = 0
    while t < steps:
        rows = (next_step == t).nonzero().squeeze(1)  # the samples due now; nobody else is touched
        xt = x.select(1, t).index_select(0, rows)
        if emb is not None:
            xt = F.embedding(xt, emb)
        if lstm:
            hn, cn = lstm_rows(xt, h.index_select(0, rows), c.index_select(0, rows), w_cat, b_cat, w_packed)
            c.index_copy_(0, rows, cn)
            g = cn  # the paper's LSTM gate reads the cell state
        else:
            hn = torch.gru_cell(xt, h.index_select(0, rows), w_ih, w_hh, b_ih, b_hh)
            g = hn
        h.index_copy_(0, rows, hn)
        updates.select(1, t).index_fill_(0, rows, True)
        if t < steps - 1:
            p = torch.sigmoid(torch.mv(g, w_g) + b_g)
            next_step.index_copy_(0, rows, steps_to_next_update(p, threshold, steps + 1) + t)
        else:
            next_step.index_fill_(0, rows, steps)
        t = int(next_step.min())  # jump straight to the next step where any sample is due
    return h, updates


_LOOPS = {"rounds": _execute_rounds, "steps": _execute_loop}
_SCRIPTED: dict[str, object] = {}


def _scripted_loop(schedule: str = "rounds") -> object:
    """The TorchScript-compiled execute loop (compiled on first use; eager fallback if scripting fails)."""
    if schedule not in _SCRIPTED:
        try:
            with warnings.catch_warnings():  # torch.jit.script is deprecated in favour of torch.compile, which
                warnings.simplefilter("ignore")  # cannot capture this data-dependent loop without graph breaks
                _SCRIPTED[schedule] = torch.jit.script(_LOOPS[schedule])
        except Exception:  # pragma: no cover - scripting is an optimisation only
            _SCRIPTED[schedule] = _LOOPS[schedule]
    return _SCRIPTED[schedule]


@dataclass(frozen=True)
class SkipRNNConfig:
    """Args:
    cell: ``"lstm"`` or ``"gru"``. hidden_size: state size H. num_classes: classes.
    vocab_size: token inputs (None for float feature inputs). embed_dim: embedding size (tokens).
    input_size: feature size F (feature inputs). max_len: example sequence length (any length is accepted).
    threshold: θ, the accumulator value that triggers an update (0.5 = the paper's rounding); inference knob.
    budget: target fraction of steps that update (BudgetLoss target), None for no budget loss.
    budget_weight: weight of the budget loss. gate_bias: initial bias of the update-probability gate.
    """

    cell: CellKind = "lstm"
    hidden_size: int = 128
    num_classes: int = 2
    vocab_size: int | None = None
    embed_dim: int = 64
    input_size: int | None = None
    max_len: int = 32
    threshold: float = 0.5
    budget: float | None = 0.5
    budget_weight: float = 1.0
    gate_bias: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")


@dataclass
class SkipRNNOutput(DynamicOutput):
    """Skip RNN output; ``decisions["updates"]`` is (B, T) bool (True: the state was updated at that step).

    Attributes:
        update_prob: (B, T) the accumulated update probability ``ũ_t`` the decision was taken from (train and
            simulate mode; None in execute mode, where it is never computed for skipped steps).
    """

    update_prob: torch.Tensor | None = None

    @property
    def skipped_fraction(self) -> torch.Tensor:
        """(B,) fraction of steps each sample skipped."""
        return 1.0 - self.decisions["updates"].float().mean(1)


class SkipRNN(SequenceModel):
    """A one-layer Skip LSTM/GRU classifier over token ids (B, T) or features (B, T, F); see the module docstring."""

    def __init__(self, cfg: SkipRNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = RecurrentBackbone(cell=cfg.cell, hidden_size=cfg.hidden_size, num_classes=cfg.num_classes,
                                          vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                                          input_size=cfg.input_size)
        self.gate = nn.Linear(cfg.hidden_size, 1)
        nn.init.constant_(self.gate.bias, cfg.gate_bias)
        self.budget_loss = BudgetLoss(target=cfg.budget, weight=cfg.budget_weight) if cfg.budget else None
        self.threshold = float(cfg.threshold)
        self.num_classes = cfg.num_classes
        self._init_sequence_io(vocab_size=cfg.vocab_size, input_size=cfg.input_size, max_len=cfg.max_len)
        self.script = True
        #: execute-mode scheduling: ``"rounds"`` (each round runs every sample's next update, wherever it falls
        #: in time) or ``"steps"`` (the due rows of one time step at a time); same arithmetic, same results.
        self.schedule: Literal["rounds", "steps"] = "rounds"
        #: run the LSTM step's GEMM with oneDNN's pre-packed weights on CPU (float32, without autograd), as the
        #: fused ``nn.LSTM`` does; ``False``: ``addmm``. Same arithmetic up to float rounding.
        self.pack = True

    def _use_packed_gemm(self) -> bool:
        """The packed oneDNN op has no autograd formula: used for inference only (no_grad / inference_mode)."""
        return self.pack and not torch.is_grad_enabled() and onednn_linear_available()

    # ------------------------------------------------------------------------------------------- contract
    def set_threshold(self, threshold: float) -> None:
        """Set θ (inference knob): the next update comes ``ceil(θ / p)`` steps after one at probability p."""
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
        self.threshold = float(threshold)

    def config_dict(self) -> dict[str, object]:
        return asdict(self.config)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> SkipRNNOutput:
        mode = resolve_mode(self, mode)
        x = check_sequence_batch(self, x)
        if mode is Mode.EXECUTE:
            h, updates, prob = self._execute(x)
        else:
            h, updates, prob, u_relaxed = self._dense(x, relaxed=mode is Mode.TRAIN)
        logits = self.backbone.head(h)
        ledger = self._charge(updates)
        aux: dict[str, torch.Tensor] = {}
        if mode is Mode.TRAIN and self.budget_loss is not None and not self._all_on:
            aux["budget"] = self.budget_loss(u_relaxed.mean(1))
        return SkipRNNOutput(logits=logits, cost=ledger.flops, decisions={"updates": updates}, mode=mode,
                             aux_losses=aux, cost_by_part=ledger.by_part, update_prob=prob)

    def _charge(self, updates: torch.Tensor) -> CostLedger:
        """Per-sample FLOPs from the (B, T) updates: cell steps, gate evaluations (none after the last step)."""
        bb = self.backbone
        ledger = CostLedger.zeros(updates.shape[0], device=updates.device, track_parts=True)
        n_upd = updates.sum(1).to(torch.float64)
        ledger.charge(n_upd * bb.step_flops, part="cell")
        if not self._all_on:
            n_gate = updates[:, :-1].sum(1).to(torch.float64)
            ledger.charge(n_gate * self.gate.in_features, part="gate")
        ledger.charge(float(bb.head_flops), part="head")
        return ledger

    def _gate_prob(self, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.mv(g, self.gate.weight[0]) + self.gate.bias)

    def _dense(self, x: torch.Tensor, *, relaxed: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train/simulate: the cell on the full batch at every step; hard or straight-through updates."""
        bb = self.backbone
        feats = bb.features(x)  # (B, T, F)
        b, steps = feats.shape[:2]
        h, c = bb.zero_state(b, feats)
        next_step = torch.zeros(b, dtype=torch.long, device=feats.device)
        last_update = torch.zeros(b, dtype=torch.long, device=feats.device)
        p_last = torch.ones(b, dtype=feats.dtype, device=feats.device)
        us, probs, hard_all = [], [], []
        for t in range(steps):
            due = next_step == t  # (B,) the hard decision u_t
            if t == 0:
                cum = torch.ones_like(p_last)  # ũ_1 = 1
            else:
                cum = ((t - last_update).to(p_last.dtype) * p_last).clamp(max=1.0)  # ũ_t = min(k·p, 1)
            u = straight_through(due, cum) if relaxed and t > 0 else due.to(feats.dtype)
            hn, cn = bb.step(feats[:, t], (h, c))
            uu = u.unsqueeze(1)
            h = uu * hn + (1 - uu) * h if relaxed else torch.where(due.unsqueeze(1), hn, h)
            if bb.cell == "lstm":
                c = uu * cn + (1 - uu) * c if relaxed else torch.where(due.unsqueeze(1), cn, c)
            if t < steps - 1:
                if self._all_on:
                    nxt = torch.full_like(next_step, t + 1)
                    p = torch.ones_like(p_last)
                else:
                    p = self._gate_prob(cn if bb.cell == "lstm" else hn)
                    nxt = steps_to_next_update(p.detach(), self.threshold, steps + 1) + t
                p_last = u * p + (1 - u) * p_last if relaxed else torch.where(due, p, p_last)
                next_step = torch.where(due, nxt, next_step)
                last_update = torch.where(due, torch.full_like(last_update, t), last_update)
            us.append(u)
            probs.append(cum.detach())
            hard_all.append(due)
        return h, torch.stack(hard_all, 1), torch.stack(probs, 1), torch.stack(us, 1)

    def _execute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        bb = self.backbone
        if self._all_on:  # every step updates: exactly the fused static network
            _, (h, _) = bb.run_fused(bb.features(x))
            return h, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), None
        loop = _scripted_loop(self.schedule) if self.script else _LOOPS[self.schedule]
        emb = bb.embed.weight if bb.embed is not None else None
        h, updates = loop(x, emb, *bb.cell_weights(), self.gate.weight[0], self.gate.bias, self.threshold,
                          bb.cell == "lstm", self._use_packed_gemm())  # type: ignore[operator]
        return h, updates, None


def _build(defaults: dict, overrides: dict) -> SkipRNN:
    return SkipRNN(SkipRNNConfig(**{**defaults, **overrides}))


@register_model
def skip_lstm_sst2(*, vocab_size: int = 16384, hidden_size: int = 128, embed_dim: int = 128, max_len: int = 48,
                   threshold: float = 0.5, budget: float | None = 0.5, budget_weight: float = 1.0,
                   gate_bias: float = 1.0) -> SkipRNN:
    """Skip LSTM over SST-2 token ids (vocabulary from :func:`dynaneural.data.sst2.load_sst2`)."""
    return _build(dict(cell="lstm", num_classes=2), dict(vocab_size=vocab_size, hidden_size=hidden_size,
                                                         embed_dim=embed_dim, max_len=max_len, threshold=threshold,
                                                         budget=budget, budget_weight=budget_weight,
                                                         gate_bias=gate_bias))


@register_model
def skip_gru_sst2(*, vocab_size: int = 16384, hidden_size: int = 128, embed_dim: int = 128, max_len: int = 48,
                  threshold: float = 0.5, budget: float | None = 0.5, budget_weight: float = 1.0,
                  gate_bias: float = 1.0) -> SkipRNN:
    """Skip GRU over SST-2 token ids."""
    return _build(dict(cell="gru", num_classes=2), dict(vocab_size=vocab_size, hidden_size=hidden_size,
                                                        embed_dim=embed_dim, max_len=max_len, threshold=threshold,
                                                        budget=budget, budget_weight=budget_weight,
                                                        gate_bias=gate_bias))


@register_model
def skip_lstm(*, input_size: int = 128, hidden_size: int = 512, num_classes: int = 10, max_len: int = 100,
              threshold: float = 0.5, budget: float | None = 0.5, budget_weight: float = 1.0, gate_bias: float = 0.0,
              cell: Literal["lstm", "gru"] = "lstm") -> SkipRNN:
    """Skip LSTM (or GRU with ``cell="gru"``) over float feature sequences (B, T, input_size)."""
    return _build({}, dict(cell=cell, input_size=input_size, hidden_size=hidden_size, num_classes=num_classes,
                           max_len=max_len, threshold=threshold, budget=budget, budget_weight=budget_weight,
                           gate_bias=gate_bias))


@register_model
def test_skip_lstm() -> SkipRNN:
    """Tiny Skip LSTM on token ids; gate weights scaled so that update probabilities spread around 0.3–0.7."""
    m = _build({}, dict(cell="lstm", vocab_size=50, embed_dim=8, hidden_size=16, num_classes=3, max_len=12))
    with torch.no_grad():
        m.gate.weight.mul_(8.0)
    return m


@register_model
def test_skip_gru() -> SkipRNN:
    """Tiny Skip GRU on float features."""
    m = _build({}, dict(cell="gru", input_size=6, hidden_size=16, num_classes=3, max_len=12))
    with torch.no_grad():
        m.gate.weight.mul_(8.0)
    return m
