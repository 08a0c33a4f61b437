"""Early-stop reading: classify after every chunk of tokens and stop as soon as the answer is clear.

Paper: K. Yu, Y. Liu, A. G. Schwing, J. Peng, "Fast and Accurate Text Classification: Skimming, Rereading and
Early Stopping", ICLR 2018 Workshop (openreview ``ryZ8sz-Ab``); the stop rule follows the early-exit literature
(BranchyNet, Teerapittayanon et al., ICPR 2016, arXiv:1709.01686): a shared classifier reads the LSTM state after
each chunk of ``L`` tokens, and a sample stops at the first chunk whose exit score (max-softmax ``confidence``,
``entropy`` or ``patience``, :mod:`dynaneural.policies.exit_rules`) reaches the threshold — the inference knob
calibrated to a budget. The last chunk always answers.

Training (:meth:`EarlyStopReader.loss`) is the library's multi-exit objective over time
(:class:`~dynaneural.objectives.MultiExitLoss` on the per-chunk predictions): the cross-entropy of every chunk's
prediction, so early states learn to answer, optionally weighted toward later chunks and with self-distillation
from the last chunk (``distill_alpha``). ``simulate`` runs the fused LSTM over the whole sequence and
applies the stop decisions afterwards; ``execute`` runs the fused ``nn.LSTM`` chunk by chunk on the samples
still reading only (compact batch carrying their state) — a stopped sample's remaining tokens are never read.
Ledger parts: ``cell`` (tokens read), ``head`` (classifier evaluations, one per chunk read).

Token inputs are read **right-padded** (text first, ``padding_idx`` after it; :attr:`EarlyStopReader.padding_side`
tells a data pipeline so) and, with ``stop_at_end`` (the default), each sample answers at the latest after the
chunk holding its own last token, from the state at that token, and its prediction stops changing there (in
train/simulate the chunk logits after a sample's end repeat that answer, so the multi-exit loss trains every chunk
a sample really reaches). The padding after that chunk is never read. Inside it, the batched fused LSTM steps over
a text's trailing padding with the rest of the chunk and the result is discarded; the ledger charges each sample
the tokens of its own text it read, which is what the text costs alone (tested). A left-padded batch is refused. Session 12 found that the SST-2 bench had fed
this reader left-padded batches, so a shorter sentence of a batch read padding *before* its text and every sample
ran to the batch's last chunk (BENCHMARKS.md has the figures before and after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import resolve_mode
from dynaneural.execution import Mode, tree_index_select
from dynaneural.objectives import MultiExitLoss
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import create_exit_rule
from dynaneural.registry import register_model
from dynaneural.temporal_wise.sequence.common import (
    RecurrentBackbone,
    SequenceModel,
    check_sequence_batch,
)

__all__ = ["EarlyStopReader", "EarlyStopConfig", "EarlyStopOutput"]


@dataclass(frozen=True)
class EarlyStopConfig:
    """Args:
    hidden_size, num_classes, vocab_size, embed_dim, input_size, max_len: as for the other sequence models.
    chunk: L, tokens read between stop decisions. rule: exit rule name. threshold: score needed to stop.
    exit_weights: per-chunk loss weights, ``uniform`` or ``linear`` (``MultiExitLoss``; the number of chunks varies
    with the batch's length, so only the named schemes). distill_alpha: share of self-distillation from the last
    chunk in every earlier chunk's loss (0: plain cross-entropy).
    stop_at_end: token inputs: a sample answers at the latest after the chunk holding its last token (the batch
    must be right-padded with ``padding_idx``); False: every sample may read to the batch's last chunk.
    padding_idx: the padding token id.
    """

    hidden_size: int = 128
    num_classes: int = 2
    vocab_size: int | None = None
    embed_dim: int = 64
    input_size: int | None = None
    max_len: int = 48
    chunk: int = 8
    rule: str = "confidence"
    threshold: float = 0.9
    exit_weights: str = "uniform"
    distill_alpha: float = 0.0
    stop_at_end: bool = True
    padding_idx: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.exit_weights not in ("uniform", "linear"):
            raise ValueError(f"exit_weights must be 'uniform' or 'linear', got {self.exit_weights!r}")


@dataclass
class EarlyStopOutput(DynamicOutput):
    """``decisions``: ``read`` (B, T) bool, ``stop_chunk`` (B,) index of the chunk each sample stopped after.

    Attributes:
        chunk_logits: logits after every chunk, each (B, C) (train/simulate; None in execute mode).
        chunk_scores: (B, J) exit scores (simulate).
    """

    chunk_logits: list[torch.Tensor] | None = None
    chunk_scores: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class EarlyStopReader(SequenceModel):
    """LSTM reader with a stop decision after every chunk; see the module docstring."""

    padding_side = "right"  # token batches: text first, then padding (a data pipeline reads this)

    def __init__(self, cfg: EarlyStopConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = RecurrentBackbone(cell="lstm", hidden_size=cfg.hidden_size, num_classes=cfg.num_classes,
                                          vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                                          input_size=cfg.input_size)
        self.rule = create_exit_rule(cfg.rule)
        self.threshold = float(cfg.threshold)
        self.num_classes = cfg.num_classes
        self.objective = MultiExitLoss(weights=cfg.exit_weights, distill_alpha=cfg.distill_alpha)
        self._init_sequence_io(vocab_size=cfg.vocab_size, input_size=cfg.input_size, max_len=cfg.max_len)

    def set_threshold(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def example_input(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token inputs: right-padded texts of random lengths (1 … max_len) of non-padding ids."""
        if self.config.vocab_size is None or not self.config.stop_at_end:
            return super().example_input(batch_size, generator=generator)
        device = next(iter(self.parameters())).device
        steps = self.input_shape[0]
        ids = torch.randint(0, self.config.vocab_size - 1, (batch_size, steps), generator=generator).to(device)
        ids = ids + (ids >= self.config.padding_idx).long()  # every id but the padding one
        lengths = torch.randint(1, steps + 1, (batch_size, 1), generator=generator).to(device)
        return torch.where(torch.arange(steps, device=device)[None, :] < lengths, ids,
                           torch.full_like(ids, self.config.padding_idx))

    def loss(self, out: EarlyStopOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The multi-exit objective over the chunk predictions (train/simulate), else the final cross-entropy."""
        logits = out.chunk_logits or [out.logits]
        parts = self.objective(logits, y)
        return {"loss": parts["loss"], "distill": parts["distill"],
                "final_ce": F.cross_entropy(logits[-1], y).detach()}

    def _bounds(self, steps: int) -> list[tuple[int, int]]:
        L = self.config.chunk
        return [(j * L, min((j + 1) * L, steps)) for j in range(math.ceil(steps / L))]

    def last_chunks(self, x: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) index of the chunk holding each sample's last token, and (B,) its length in tokens.

        With ``stop_at_end`` and token inputs the length is the number of non-padding ids, which must all come
        first (right padding); otherwise every sample's last chunk is the batch's last.
        """
        b, steps = x.shape[:2]
        if self.config.stop_at_end and self.config.vocab_size is not None:
            valid = x != self.config.padding_idx
            if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
                raise ValueError(f"{type(self).__name__} reads right-padded token ids (text first, then padding id "
                                 f"{self.config.padding_idx}); got a token after padding. Pad on the right, or "
                                 "build the reader with stop_at_end=False")
            lengths = valid.sum(1).clamp(min=1)
            return ((lengths + self.config.chunk - 1) // self.config.chunk - 1).clamp(max=n_chunks - 1), lengths
        return (torch.full((b,), n_chunks - 1, dtype=torch.long, device=x.device),
                torch.full((b,), steps, dtype=torch.long, device=x.device))

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> EarlyStopOutput:
        mode = resolve_mode(self, mode)
        x = check_sequence_batch(self, x)
        bb = self.backbone
        b, steps = x.shape[:2]
        bounds = self._bounds(steps)
        n_chunks = len(bounds)
        last, lengths = self.last_chunks(x, n_chunks)
        chunk_logits = scores = None
        if self._all_on:  # the static twin: reads the whole (padded) batch, one answer at the end
            _, (h, _) = bb.run_fused(bb.features(x))
            logits = bb.head(h)
            stop = torch.full((b,), n_chunks - 1, dtype=torch.long, device=x.device)
            heads = torch.ones(b, dtype=torch.float64, device=x.device)
        elif mode is Mode.EXECUTE:
            logits, stop = self._execute(x, bounds, last, lengths)
            heads = (stop + 1).to(torch.float64)
        else:
            out, _ = bb.run_fused(bb.features(x))  # (B, T, H): every state, then decide
            chunk_logits = [bb.head(out[:, e - 1]) for _, e in bounds]
            if bool((lengths < steps).any()):
                # a sample's answer from its last chunk on is the state at its last token (never the padding
                # after it), and it no longer changes
                final = bb.head(out[torch.arange(b, device=x.device), lengths - 1])  # (B, C)
                after = torch.arange(n_chunks, device=x.device)[None, :] >= last[:, None]  # (B, J)
                chunk_logits = [torch.where(after[:, j, None], final, z) for j, z in enumerate(chunk_logits)]
            state = self.rule.init_state(b, x.device)
            cols = []
            for z in chunk_logits:
                s, state = self.rule.score(z.detach(), state)
                cols.append(s)
            scores = torch.stack(cols, 1)  # (B, J)
            ready = scores >= self.threshold
            ready |= torch.arange(n_chunks, device=x.device)[None, :] >= last[:, None]
            stop = ready.long().argmax(1)  # first chunk ready
            logits = torch.stack(chunk_logits, 1)[torch.arange(b, device=x.device), stop]
            heads = (stop + 1).to(torch.float64)
        ends = torch.tensor([e for _, e in bounds], device=x.device)
        # tokens of its own text each sample read (the static twin, all on, reads the whole padded batch)
        n_read = ends[stop] if self._all_on else torch.minimum(ends[stop], lengths)
        read = torch.arange(steps, device=x.device).unsqueeze(0) < n_read.unsqueeze(1)
        ledger = CostLedger.zeros(b, device=x.device, track_parts=True)
        ledger.charge(n_read.to(torch.float64) * bb.step_flops, part="cell")
        ledger.charge(heads * bb.head_flops, part="head")
        read_fraction = torch.minimum(n_read, lengths).to(torch.float64) / lengths.to(torch.float64)
        return EarlyStopOutput(logits=logits, cost=ledger.flops,
                               decisions={"read": read, "stop_chunk": stop, "read_fraction": read_fraction},
                               mode=mode, cost_by_part=ledger.by_part, chunk_logits=chunk_logits,
                               chunk_scores=scores)

    def _execute(self, x: torch.Tensor, bounds: list[tuple[int, int]], last: torch.Tensor, lengths: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.backbone
        b = x.shape[0]
        w = bb.head.weight
        logits = torch.zeros(b, self.num_classes, dtype=w.dtype, device=x.device)
        stop = torch.zeros(b, dtype=torch.long, device=x.device)
        rows = torch.arange(b, device=x.device)
        state = bb.zero_state(b, w)
        rule_state = self.rule.init_state(b, x.device)
        xr = x
        for j, (s, e) in enumerate(bounds):
            out, state = bb.run_fused(bb.features(xr[:, s:e]), state)  # fused LSTM over this chunk, rows only
            h = state[0]
            ending = (last == j) & (lengths < e)  # texts that end inside this chunk answer from their last token
            if bool(ending.any()):
                ei = ending.nonzero().squeeze(1)
                h = h.index_copy(0, ei, out[ei, lengths.index_select(0, ei) - s - 1])
            z = bb.head(h)
            if j == len(bounds) - 1:
                logits.index_copy_(0, rows, z)
                stop.index_fill_(0, rows, j)
                break
            score, rule_state = self.rule.score(z, rule_state)
            done = (score >= self.threshold) | (last == j)  # confident, or its text ends in this chunk
            if bool(done.any()):
                di = done.nonzero().squeeze(1)
                logits.index_copy_(0, rows.index_select(0, di), z.index_select(0, di))
                stop.index_fill_(0, rows.index_select(0, di), j)
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                rows, xr = rows.index_select(0, keep), xr.index_select(0, keep)
                last, lengths = last.index_select(0, keep), lengths.index_select(0, keep)
                state = tree_index_select(state, keep)
                rule_state = tree_index_select(rule_state, keep)
        return logits, stop


def _build(defaults: dict, overrides: dict) -> EarlyStopReader:
    return EarlyStopReader(EarlyStopConfig(**{**defaults, **overrides}))


@register_model
def early_stop_lstm_sst2(*, vocab_size: int = 16384, hidden_size: int = 128, embed_dim: int = 128,
                         max_len: int = 48, chunk: int = 4, rule: str = "confidence", threshold: float = 0.9,
                         exit_weights: str = "uniform", distill_alpha: float = 0.0, stop_at_end: bool = True
                         ) -> EarlyStopReader:
    """Early-stop LSTM reader over SST-2 token ids (padding must be on the right so reading starts at the text)."""
    return _build(dict(num_classes=2), dict(vocab_size=vocab_size, hidden_size=hidden_size, embed_dim=embed_dim,
                                            max_len=max_len, chunk=chunk, rule=rule, threshold=threshold,
                                            exit_weights=exit_weights, distill_alpha=distill_alpha,
                                            stop_at_end=stop_at_end))


@register_model
def test_early_stop_lstm() -> EarlyStopReader:
    """Tiny early-stop reader on token ids; a low confidence threshold so about half the samples stop early."""
    m = _build({}, dict(vocab_size=40, embed_dim=8, hidden_size=16, num_classes=3, max_len=12, chunk=4,
                        threshold=0.36))
    with torch.no_grad():
        m.backbone.head.weight.mul_(4.0)
    return m
