"""Early exit over time: read a sequence step by step (video frames, spectrogram chunks) and stop once confident.

The early-exit idea of BranchyNet (Teerapittayanon et al., ICPR 2016, arXiv:1709.01686) and SDN (Kaya et al.,
ICML 2019, arXiv:1810.07052) applied along time instead of depth, as in early-stopping readers (e.g. Yu et al.,
"Learning to Skim Text", ACL 2017, arXiv:1704.06877) and early video recognition: a per-step encoder feeds an LSTM
memory, a classifier reads the memory after every step, and a sample stops at the first step whose exit-rule score
(``policies/exit_rules.py``: confidence, entropy, patience) reaches the threshold. Frames after the exit are never
encoded.

Modes (see :mod:`dynaneural.execution`):

* train — every step of every sample (fused LSTM); ``step_logits`` (B, S, C) for the per-step loss
  (:meth:`RecurrentExitNetwork.training_loss`);
* simulate — the same full computation, then each sample's exit step is the first step whose score reaches the
  threshold; logits and cost are gathered from it: the reference semantics;
* execute — step by step on a shrinking batch: only the rows still reading have their next step gathered
  (``index_select``), encoded and fed to the memory; the samples that stop are scattered out and leave the batch.
  With ``slots=n`` a whole stream of sequences runs with continuous batching
  (:meth:`RecurrentExitNetwork._execute_stream`): a sequence that exits hands its row to the next one, so every
  step runs on ``n`` rows instead of a shrinking remainder; each sequence gets the same result.

With the threshold at ``+inf`` (``all_on``) no sample exits and the classifier only runs after the last step: the
model is its static twin (encoder over every step, fused LSTM, classifier), same weights and cost.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.calibration.thresholds import KnobCalibration, calibrate_knob
from dynaneural.compute.flops import static_flops
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import DynamicModel, resolve_mode
from dynaneural.execution import Mode, check_slots, retire_rows, scatter_exits, tree_cat, tree_index_select, tree_slice
from dynaneural.outputs import DynamicOutput
from dynaneural.policies.exit_rules import ExitRule, create_exit_rule
from dynaneural.registry import register_model
from dynaneural.temporal_wise.video.encoders import FrameEncoder, RecurrentMemory, StaticRecurrentClassifier
from dynaneural.validation import check_batch

__all__ = ["RecurrentExitNetwork", "TemporalExitOutput", "first_exit_step"]


@dataclass
class TemporalExitOutput(DynamicOutput):
    """Output of an early-exit-over-time model.

    Attributes:
        step_logits: logits after every step, (B, S, C); train and simulate modes only.
        step_scores: the exit rule's score after every step, (B, S) (NaN before ``min_steps``); simulate only.
    """

    step_logits: torch.Tensor | None = None
    step_scores: torch.Tensor | None = None


def first_exit_step(scores: torch.Tensor, threshold: float, *, min_steps: int = 1) -> torch.Tensor:
    """(N,) the first step (0-based) at which ``scores`` (N, S) reaches ``threshold``, at or after step
    ``min_steps - 1``; S - 1 (the last step) where it never does."""
    scores.shape[1]
    stop = scores >= threshold
    stop[:, : max(min_steps - 1, 0)] = False
    stop[:, -1] = True
    return torch.argmax(stop.to(torch.uint8), dim=1)  # argmax returns the first maximal index


class RecurrentExitNetwork(DynamicModel):
    """Encoder per step → LSTM memory → classifier after every step → exit when the rule's score is high enough.

    Args:
        encoder: maps one step's input (n, *step_shape) to features (n, F); its ``out_features`` gives F.
        hidden_size: LSTM units.
        num_classes: classes.
        input_shape: per-sample input, (T, *rest) with time first.
        chunk: consecutive time entries read per step (S = T / chunk steps); a step's input is then
            ``(chunk * rest[0], *rest[1:])`` (a chunk of spectrogram frames is flattened, a video frame stays a frame).
        exit_rule: the exit rule (``confidence``, ``entropy``, ``patience``).
        exit_threshold: the threshold on the rule's score (``+inf`` disables exits: the static twin).
        min_steps: steps every sample reads before it may exit.
        step_weights: weights of the per-step losses in :meth:`training_loss`: ``uniform`` or ``linear``.
    """

    def __init__(self, *, encoder: nn.Module, hidden_size: int, num_classes: int, input_shape: tuple[int, ...],
                 chunk: int = 1, exit_rule: str | ExitRule = "confidence", exit_threshold: float = float("inf"),
                 min_steps: int = 1, step_weights: Literal["uniform", "linear"] = "uniform") -> None:
        super().__init__()
        t, *rest = (int(d) for d in input_shape)
        if chunk < 1 or t % chunk:
            raise ValueError(f"chunk must divide the sequence length {t}, got {chunk}")
        if step_weights not in ("uniform", "linear"):
            raise ValueError(f"step_weights must be 'uniform' or 'linear', got {step_weights!r}")
        self.input_shape = (t, *rest)
        self.num_classes = int(num_classes)
        self.chunk = int(chunk)
        self.num_steps = t // chunk
        self.step_shape = (chunk * rest[0], *rest[1:]) if rest else (chunk,)
        if not 1 <= min_steps <= self.num_steps:
            raise ValueError(f"min_steps must lie in [1, {self.num_steps}], got {min_steps}")
        self.min_steps = int(min_steps)
        self.step_weights = step_weights
        self.encoder = encoder
        self.memory = RecurrentMemory(int(encoder.out_features), hidden_size)
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.exit_rule = create_exit_rule(exit_rule)
        if self.exit_rule.needs_policy:
            raise ValueError("the learned exit rule is not supported over time; use confidence, entropy or patience")
        self.register_buffer("exit_threshold", torch.tensor(float(exit_threshold)))
        self._costs: tuple[float, float, float] | None = None

    # ----------------------------------------------------------------------------------------------- costs
    def piece_flops(self) -> tuple[float, float, float]:
        """Per-sample FLOPs of (encoding one step, one LSTM step, the classifier), counted once."""
        if self._costs is None:
            p = next(self.parameters())
            was = self.training
            self.eval()
            try:
                enc = static_flops(self.encoder, torch.zeros(1, *self.step_shape, dtype=p.dtype, device=p.device))
                cls = static_flops(self.classifier, torch.zeros(1, self.memory.hidden_size, dtype=p.dtype,
                                                                device=p.device))
            finally:
                self.train(was)
            self._costs = (enc, self.memory.step_flops, cls)
        return self._costs

    @property
    def static_cost(self) -> float:
        enc, cell, cls = self.piece_flops()
        return self.num_steps * (enc + cell) + cls

    def path_costs(self, *, exits_enabled: bool = True) -> torch.Tensor:
        """(S,) float64 FLOPs paid by a sample that stops after step s (0-based)."""
        enc, cell, cls = self.piece_flops()
        s = torch.arange(self.num_steps, dtype=torch.float64)
        if not exits_enabled:
            return torch.full((self.num_steps,), self.static_cost, dtype=torch.float64)
        # The classifier runs after every step from min_steps - 1 on (to score it), and always at the exit step.
        heads = (s - (self.min_steps - 1) + 1).clamp(min=1)
        return (s + 1) * (enc + cell) + heads * cls

    # ------------------------------------------------------------------------------------------- contract
    @property
    def exits_enabled(self) -> bool:
        return float(self.exit_threshold) != float("inf")

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Every sample reads every step (exits disabled); restored after."""
        saved = self.exit_threshold.clone()
        self.exit_threshold.fill_(float("inf"))
        try:
            yield
        finally:
            self.exit_threshold.copy_(saved)

    def to_static(self) -> StaticRecurrentClassifier:
        return StaticRecurrentClassifier(self.encoder, self.memory, self.classifier, steps=self.num_steps,
                                         step_shape=self.step_shape)

    def _steps(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.num_steps, *self.step_shape)  # (B, S, *step_shape)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None, slots: int | None = None
                ) -> TemporalExitOutput:
        """Classify a batch (B, *input_shape); see the module docstring for the modes.

        ``slots`` (execute mode only): run ``x`` as a stream with at most ``slots`` sequences in flight (continuous
        batching, :meth:`_execute_stream`) instead of as one batch; same per-sequence results.
        """
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        if slots is not None:
            if mode is not Mode.EXECUTE:
                raise ValueError("slots (streamed execution) applies to execute mode only")
            return self._execute_stream(x, check_slots(slots))
        if mode is Mode.EXECUTE:
            return self._execute(x)
        return self._full(x, mode)

    def _encode_all(self, steps: torch.Tensor) -> torch.Tensor:
        b = steps.shape[0]
        return self.encoder(steps.reshape(b * self.num_steps, *self.step_shape)).view(b, self.num_steps, -1)

    def _full(self, x: torch.Tensor, mode: Mode) -> TemporalExitOutput:
        b, s = x.shape[0], self.num_steps
        hs = self.memory(self._encode_all(self._steps(x)))  # (B, S, H)
        ledger = CostLedger.zeros(b, device=x.device)
        steps_idx = torch.arange(s, device=x.device)
        if mode is Mode.TRAIN:
            step_logits = self.classifier(hs)  # (B, S, C)
            enc, cell, cls = self.piece_flops()
            ledger.charge(s * (enc + cell + cls))
            exit_step = torch.full((b,), s - 1, dtype=torch.long, device=x.device)
            return TemporalExitOutput(logits=step_logits[:, -1], cost=ledger.flops, mode=mode,
                                      decisions={"exit_step": exit_step, "frames": torch.ones(b, s, dtype=torch.bool,
                                                                                              device=x.device)},
                                      step_logits=step_logits)
        if not self.exits_enabled:
            logits = self.classifier(hs[:, -1])
            ledger.charge(self.static_cost)
            exit_step = torch.full((b,), s - 1, dtype=torch.long, device=x.device)
            return TemporalExitOutput(logits=logits, cost=ledger.flops, mode=mode,
                                      decisions={"exit_step": exit_step,
                                                 "frames": torch.ones(b, s, dtype=torch.bool, device=x.device)})
        step_logits = self.classifier(hs)
        scores = torch.full((b, s), float("nan"), device=x.device)
        state = self.exit_rule.init_state(b, x.device)
        for t in range(self.min_steps - 1, s):
            scores[:, t], state = self.exit_rule.score(step_logits[:, t], state)
        exit_step = first_exit_step(torch.nan_to_num(scores, nan=float("-inf")), float(self.exit_threshold),
                                    min_steps=self.min_steps)
        logits = step_logits.gather(1, exit_step.view(b, 1, 1).expand(b, 1, step_logits.shape[-1])).squeeze(1)
        ledger.charge(self.path_costs().to(x.device)[exit_step])
        return TemporalExitOutput(logits=logits, cost=ledger.flops, mode=mode,
                                  decisions={"exit_step": exit_step, "frames": steps_idx[None] <= exit_step[:, None]},
                                  step_logits=step_logits, step_scores=scores)

    def _execute(self, x: torch.Tensor) -> TemporalExitOutput:
        b, s = x.shape[0], self.num_steps
        steps = self._steps(x)
        enc_c, cell_c, cls_c = self.piece_flops()
        enabled = self.exits_enabled
        thr = float(self.exit_threshold)
        ledger = CostLedger.zeros(b, device=x.device)
        out = x.new_empty(b, self.num_classes)
        exit_step = torch.full((b,), s - 1, dtype=torch.long, device=x.device)
        rows: torch.Tensor | None = None  # None = every sample, in order (no gather needed yet)
        h, c = self.memory.zeros(b, x)
        state = self.exit_rule.init_state(b, x.device)
        for t in range(s):
            xt = steps[:, t] if rows is None else steps[:, t].index_select(0, rows)  # only the rows still reading
            h, c = self.memory.step(self.encoder(xt), (h, c))
            ledger.charge(enc_c + cell_c, rows)
            if t == s - 1:
                ledger.charge(cls_c, rows)
                scatter_exits(out, exit_step, rows, None, self.classifier(h), t)
                break
            if not enabled or t < self.min_steps - 1:
                continue
            z = self.classifier(h)
            ledger.charge(cls_c, rows)
            score, state = self.exit_rule.score(z, state)
            stop = score >= thr
            n_stop = int(stop.sum())  # one host sync per step
            if n_stop == 0:
                continue
            if n_stop == stop.numel():
                scatter_exits(out, exit_step, rows, None, z, t)
                break
            scatter_exits(out, exit_step, rows, stop.nonzero().squeeze(1), z, t)
            keep = (~stop).nonzero().squeeze(1)
            # Compaction: the samples that stopped leave the batch; their later frames are never encoded.
            h, c, state = h.index_select(0, keep), c.index_select(0, keep), tree_index_select(state, keep)
            rows = keep if rows is None else rows.index_select(0, keep)
        frames = torch.arange(s, device=x.device)[None] <= exit_step[:, None]
        return TemporalExitOutput(logits=out, cost=ledger.flops, mode=Mode.EXECUTE,
                                  decisions={"exit_step": exit_step, "frames": frames})

    def _execute_stream(self, x: torch.Tensor, slots: int) -> TemporalExitOutput:
        """Execute over a stream of sequences with continuous batching: at most ``slots`` sequences are in flight,
        each at its own step; one that exits frees its row and the next sequence of ``x`` takes it at the next step.

        Every piece (encoder, memory, classifier, exit rule) acts row by row, so each sequence gets what
        :meth:`_execute` computes for it: the same exit step, prediction (up to float summation order in batched
        kernels) and cost. Plain execution of a batch steps on for its slowest sequence on an ever smaller
        sub-batch, paying the kernels' per-call floors for a few rows; here each step runs on ``slots`` rows until
        the stream drains (Orca-style continuous batching, Yu et al., OSDI 2022). It raises throughput on a
        stream, not the latency of one batch.

        Rows stay in admission order (new sequences are appended, compaction keeps the order), so the rows that
        may already exit (at or past step ``min_steps - 1``) are a prefix of the batch: the sequences admitted in
        the last ``min_steps - 1`` steps are the suffix, and the classifier never runs on them.
        """
        n, s = x.shape[0], self.num_steps
        dev = x.device
        inputs = self._steps(x).reshape(n * s, *self.step_shape)
        thr, enabled = float(self.exit_threshold), self.exits_enabled
        out = x.new_empty(n, self.num_classes)
        exit_step = torch.full((n,), s - 1, dtype=torch.long, device=dev)
        idx = torch.zeros(0, dtype=torch.long, device=dev)  # per row: the sequence it holds ...
        step = torch.zeros(0, dtype=torch.long, device=dev)  # ... and the step it is at
        h, c = self.memory.zeros(0, x)
        state = self.exit_rule.init_state(0, dev)
        young: collections.deque[int] = collections.deque(maxlen=self.min_steps - 1)  # admissions per recent step
        admitted = 0
        while admitted < n or idx.numel():
            free = min(slots - idx.numel(), n - admitted)
            young.append(max(free, 0))
            if free > 0:  # new sequences take the free rows, at their first step
                new = torch.arange(admitted, admitted + free, device=dev)
                h0, c0 = self.memory.zeros(free, x)
                idx, step = torch.cat([idx, new]), torch.cat([step, torch.zeros_like(new)])
                h, c = torch.cat([h, h0]), torch.cat([c, c0])
                state = tree_cat(state, self.exit_rule.init_state(free, dev))
                admitted += free
            h, c = self.memory.step(self.encoder(inputs.index_select(0, idx * s + step)), (h, c))
            m = idx.numel() - sum(young)  # rows [0, m) may exit at this step
            if m > 0:
                z: torch.Tensor | None = None
                last = step[:m] == s - 1
                if enabled:
                    z = self.classifier(h[:m])
                    score, head = self.exit_rule.score(z, tree_slice(state, None, m))
                    state = tree_cat(head, tree_slice(state, m)) if m < idx.numel() else head
                    done = last | (score >= thr)
                else:
                    done = last
                fin = done.nonzero().squeeze(1)
                if fin.numel():  # one host sync per step
                    retire_rows(out, exit_step, idx, step, fin, z.index_select(0, fin) if z is not None
                                else self.classifier(h.index_select(0, fin)))
                    keep = torch.cat([(~done).nonzero().squeeze(1), torch.arange(m, idx.numel(), device=dev)])
                    idx, step, h, c = (t.index_select(0, keep) for t in (idx, step, h, c))
                    state = tree_index_select(state, keep)
            step = step + 1
        ledger = CostLedger.zeros(n, device=dev)
        ledger.charge(self.path_costs(exits_enabled=enabled).to(dev)[exit_step])  # each sequence's path: what ran
        frames = torch.arange(s, device=dev)[None] <= exit_step[:, None]
        return TemporalExitOutput(logits=out, cost=ledger.flops, mode=Mode.EXECUTE,
                                  decisions={"exit_step": exit_step, "frames": frames})

    # ------------------------------------------------------------------------------------ training, budget
    def training_loss(self, out: TemporalExitOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted mean of the cross-entropy after every step (every step must be a good exit)."""
        if out.step_logits is None:
            raise ValueError("training_loss needs step_logits: run the model in train or simulate mode")
        s = out.step_logits.shape[1]
        w = torch.ones(s) if self.step_weights == "uniform" else torch.arange(1, s + 1, dtype=torch.float32)
        w = (w / w.sum()).to(out.step_logits.device)
        ce = F.cross_entropy(out.step_logits.flatten(0, 1), y.repeat_interleave(s), reduction="none").view(-1, s)
        return {"loss": (ce.mean(0) * w).sum(), "ce_last": ce[:, -1].mean().detach()}

    @torch.no_grad()
    def step_scores(self, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """(N, S) exit-rule scores after every step (simulate mode, thresholds not involved)."""
        was = self.training
        self.eval()
        saved = self.exit_threshold.clone()
        self.exit_threshold.fill_(0.0)  # any finite value: scores are computed for every step
        try:
            parts = [self(x[i:i + batch_size], mode="simulate").step_scores for i in range(0, x.shape[0], batch_size)]
        finally:
            self.exit_threshold.copy_(saved)
            self.train(was)
        return torch.nan_to_num(torch.cat(parts), nan=float("-inf"))  # type: ignore[arg-type]

    def calibrate(self, x: torch.Tensor, *, budget: float, unit: Literal["fraction", "steps"] = "fraction",
                  batch_size: int = 256) -> KnobCalibration:
        """Fit the exit threshold so that the mean cost on ``x`` (validation data) meets ``budget``, a fraction of
        the static FLOPs or a mean number of steps read; offline, from one pass of scores."""
        scores = self.step_scores(x, batch_size=batch_size)
        path = self.path_costs() / self.static_cost

        def mean_cost(thr: float) -> float:
            step = first_exit_step(scores, thr, min_steps=self.min_steps)
            return float(path[step].mean()) if unit == "fraction" else float((step + 1).double().mean())

        finite = scores[torch.isfinite(scores)]
        return calibrate_knob(mean_cost=mean_cost, set_knob=lambda v: self.exit_threshold.fill_(float(v)),
                              budget=budget, lo=float(finite.min()), hi=float(finite.max()) + 1e-3, unit=unit,
                              current=float(self.exit_threshold))


def _frame_exit(*, frames: int, size: int, widths: tuple[int, ...], hidden: int, num_classes: int,
                exit_rule: str, exit_threshold: float, min_steps: int) -> RecurrentExitNetwork:
    return RecurrentExitNetwork(encoder=FrameEncoder(in_chans=1, widths=widths), hidden_size=hidden,
                                num_classes=num_classes, input_shape=(frames, 1, size, size), exit_rule=exit_rule,
                                exit_threshold=exit_threshold, min_steps=min_steps)


@register_model
def frame_exit_moving_digits(*, frames: int = 10, size: int = 32, widths: tuple[int, ...] = (16, 32, 64),
                             hidden: int = 64, num_classes: int = 10, exit_rule: str = "confidence",
                             exit_threshold: float = float("inf"), min_steps: int = 1) -> RecurrentExitNetwork:
    """Early exit over the frames of moving-digits clips (B, T, 1, H, W): 3-layer CNN per frame, LSTM 64."""
    return _frame_exit(frames=frames, size=size, widths=widths, hidden=hidden, num_classes=num_classes,
                       exit_rule=exit_rule, exit_threshold=exit_threshold, min_steps=min_steps)


@register_model
def test_frame_exit(*, exit_rule: str = "confidence", exit_threshold: float | None = None) -> RecurrentExitNetwork:
    """Tiny variant for tests: 4 frames of 1×16×16, 3 classes. Unless ``exit_threshold`` is given, the threshold
    is calibrated at init on a fixed random batch to 60 % of the static cost, so samples exit at different steps."""
    model = _frame_exit(frames=4, size=16, widths=(4, 8), hidden=8, num_classes=3, exit_rule=exit_rule,
                        exit_threshold=0.5 if exit_threshold is None else exit_threshold, min_steps=1)
    if exit_threshold is None:
        with torch.no_grad():
            model.classifier.weight.mul_(8.0)  # spread the random-init confidences across samples
        model.calibrate(model.example_input(64, generator=torch.Generator().manual_seed(123)), budget=0.6)
    return model
