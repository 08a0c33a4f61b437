"""AdaFrame: adaptive frame selection with a memory, a REINFORCE-trained frame policy and a utility-based stop.

Paper: Z. Wu, C. Xiong, C.-Y. Ma, R. Socher, L. S. Davis, "AdaFrame: Adaptive Frame Selection for Fast Video
Recognition", CVPR 2019, arXiv:1811.12432.

At step t the model looks at one frame: a per-frame CNN encodes it, an LSTM memory accumulates what has been
seen, a classifier predicts from the memory, a *utility* network predicts the future reward of looking further,
and a *selection policy* picks the next frame to look at among those not seen yet. The reward of a step is how
much it improved the prediction (Sec. 3.2): with the margin ``m_t = p_t[y] - max_{c != y} p_t[c]``,
``r_t = max(0, m_t - max_{t' < t} m_t')``. The policy is trained with REINFORCE (``policies.ReinforceLoss``) on
the discounted future rewards, and the utility network is its learned baseline (trained to regress them), which
is also what decides when to stop at inference: a sample stops once the predicted future gain is small
(``-utility >= stop_threshold``; the threshold is calibrated to a frame budget). A ``confidence`` stop rule
(max-softmax of the current prediction, as in ``policies/exit_rules.py``) is offered as an alternative.

Not reproduced: the paper's *global memory* (a light CNN over down-sampled versions of all frames, giving the
policy context before it looks) — it would process every frame, which this library's execute mode forbids for
the frames a sample does not look at; the policy here sees only the memory of the frames looked at. The paper
selects a continuous location with a Gaussian policy; here the policy is categorical over the unseen frames
(``policies.sample_categorical``), which is the same choice on a discrete clip.

Modes (see :mod:`dynaneural.execution`):

* train — every sample takes ``max_steps`` steps, next frames *sampled* from the policy; per-step logits, action
  log-probabilities, entropies and utilities are returned for :meth:`AdaFrame.training_loss`;
* simulate — every frame of every sample is encoded (full computation), then the greedy trajectory is followed
  from the precomputed features for ``max_steps`` steps and each sample's stop step applied as a mask;
* execute — step by step: only the samples still looking have their chosen frame gathered (``x[rows, frame]``),
  encoded and fed to the memory; samples that stop leave the batch; unseen frames are never encoded. With
  ``slots=n`` a whole stream of clips runs with continuous batching (:meth:`AdaFrame._execute_stream`): a clip
  that stops hands its slot to the next one, so the steps stay full instead of shrinking with the batch.

``all_on()`` looks at every frame in order with no policy and no stop: the static twin (per-frame CNN over all
frames, fused LSTM, classifier), same weights and cost.
"""

from __future__ import annotations

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
from dynaneural.execution import Mode, check_slots, retire_rows
from dynaneural.outputs import DynamicOutput
from dynaneural.policies.reinforce import PolicySample, ReinforceLoss, sample_categorical
from dynaneural.registry import register_model
from dynaneural.temporal_wise.video.encoders import FrameEncoder, RecurrentMemory, StaticRecurrentClassifier
from dynaneural.temporal_wise.video.frame_exit import first_exit_step
from dynaneural.validation import check_batch

__all__ = ["AdaFrame", "AdaFrameOutput", "adaframe_rewards"]

_NEG = -1e9  # logit of an already-seen frame (finite, so that 0 * log 0 stays 0 in the entropy)


@dataclass
class AdaFrameOutput(DynamicOutput):
    """Output of :class:`AdaFrame`.

    Attributes:
        step_logits: the prediction after every step, (B, K, C); train and simulate modes.
        log_probs: log-probability of each sampled next-frame action, (B, K-1); train mode.
        entropies: entropy of the policy at each action, (B, K-1); train mode.
        utilities: predicted future reward after every step but the last, (B, K-1); train mode.
        stop_scores: the stop rule's score after every step, (B, K) (-inf where no decision is taken); simulate.
    """

    step_logits: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    utilities: torch.Tensor | None = None
    stop_scores: torch.Tensor | None = None


def adaframe_rewards(step_logits: torch.Tensor, y: torch.Tensor, *, gamma: float = 0.9) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """AdaFrame's rewards and the discounted returns of the actions.

    Args:
        step_logits: (B, K, C) prediction after every step.
        y: (B,) labels.
        gamma: discount.

    Returns:
        ``(rewards, returns)``: rewards (B, K) with ``r_0 = 0`` and ``r_t = max(0, m_t - max_{t'<t} m_t')``; returns
        (B, K-1) where the action taken after step t (choosing frame t+1) earns ``sum_{j>t} gamma^(j-t-1) r_j``.
    """
    p = step_logits.detach().float().softmax(-1)  # (B, K, C)
    b, k, _ = p.shape
    true = p.gather(2, y.view(b, 1, 1).expand(b, k, 1)).squeeze(2)
    other = p.scatter(2, y.view(b, 1, 1).expand(b, k, 1), float("-inf")).amax(2)
    margin = true - other  # (B, K)
    best = torch.cummax(margin, dim=1).values
    rewards = torch.zeros_like(margin)
    rewards[:, 1:] = (margin[:, 1:] - best[:, :-1]).clamp(min=0)
    returns = torch.zeros(b, k - 1, device=margin.device)
    acc = torch.zeros(b, device=margin.device)
    for t in range(k - 2, -1, -1):
        acc = rewards[:, t + 1] + gamma * acc
        returns[:, t] = acc
    return rewards, returns


class AdaFrame(DynamicModel):
    """AdaFrame over clips (B, T, C, H, W); see the module docstring.

    Args:
        frames: T, frames per clip.
        in_chans: channels of a frame.
        size: frame height = width.
        widths: channels of the per-frame CNN's layers.
        hidden: LSTM units.
        num_classes: classes.
        max_steps: K, the most frames a sample looks at (default T).
        start_frame: the first frame every sample looks at (default the middle one).
        stop_rule: ``utility`` (stop when ``-utility >= stop_threshold``) or ``confidence`` (max-softmax).
        stop_threshold: the stop knob; ``+inf`` never stops early (calibrate it with :meth:`calibrate`).
        min_steps: frames every sample looks at before it may stop.
        gamma: discount of the future rewards.
        entropy_coef: REINFORCE entropy bonus.
        policy_weight: weight of the REINFORCE + utility terms in :meth:`training_loss`.
    """

    def __init__(self, *, frames: int, in_chans: int = 1, size: int = 32, widths: tuple[int, ...] = (16, 32, 64),
                 hidden: int = 64, num_classes: int = 10, max_steps: int | None = None, start_frame: int | None = None,
                 stop_rule: Literal["utility", "confidence"] = "utility", stop_threshold: float = float("inf"),
                 min_steps: int = 1, gamma: float = 0.9, entropy_coef: float = 0.01, policy_weight: float = 1.0
                 ) -> None:
        super().__init__()
        if frames < 2:
            raise ValueError(f"AdaFrame needs at least 2 frames, got {frames}")
        self.max_steps = int(max_steps if max_steps is not None else frames)
        if not 1 <= self.max_steps <= frames:
            raise ValueError(f"max_steps must lie in [1, {frames}], got {max_steps}")
        self.start_frame = int(start_frame if start_frame is not None else frames // 2)
        if not 0 <= self.start_frame < frames:
            raise ValueError(f"start_frame must lie in [0, {frames}), got {start_frame}")
        if stop_rule not in ("utility", "confidence"):
            raise ValueError(f"stop_rule must be 'utility' or 'confidence', got {stop_rule!r}")
        if not 1 <= min_steps <= self.max_steps:
            raise ValueError(f"min_steps must lie in [1, {self.max_steps}], got {min_steps}")
        self.frames, self.num_classes = int(frames), int(num_classes)
        self.input_shape = (self.frames, in_chans, size, size)
        self.stop_rule, self.min_steps = stop_rule, int(min_steps)
        self.gamma, self.policy_weight = float(gamma), float(policy_weight)
        self.encoder = FrameEncoder(in_chans=in_chans, widths=widths)
        self.memory = RecurrentMemory(self.encoder.out_features, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.policy = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, self.frames))
        self.utility = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.reinforce = ReinforceLoss(baseline="learned", entropy_coef=entropy_coef)
        self.register_buffer("stop_threshold", torch.tensor(float(stop_threshold)))
        self._all_on = False
        self._costs: dict[str, float] | None = None

    # ----------------------------------------------------------------------------------------------- costs
    def piece_flops(self) -> dict[str, float]:
        """Per-sample FLOPs of encoding a frame, an LSTM step, the classifier, the policy and the utility net."""
        if self._costs is None:
            p = next(self.parameters())
            was = self.training
            self.eval()
            h = torch.zeros(1, self.memory.hidden_size, dtype=p.dtype, device=p.device)
            try:
                self._costs = {
                    "encoder": static_flops(self.encoder, torch.zeros(1, *self.input_shape[1:], dtype=p.dtype,
                                                                      device=p.device)),
                    "memory": self.memory.step_flops, "classifier": static_flops(self.classifier, h),
                    "policy": static_flops(self.policy, h), "utility": static_flops(self.utility, h)}
            finally:
                self.train(was)
        return self._costs

    @property
    def static_cost(self) -> float:
        c = self.piece_flops()
        return self.frames * (c["encoder"] + c["memory"]) + c["classifier"]

    @property
    def stopping_enabled(self) -> bool:
        return float(self.stop_threshold) != float("inf") and self.max_steps > 1

    def path_costs(self) -> torch.Tensor:
        """(K,) float64 FLOPs of a sample that stops after step s (looks at s + 1 frames)."""
        c = self.piece_flops()
        k, m = self.max_steps, self.min_steps
        s = torch.arange(k, dtype=torch.float64)
        cost = (s + 1) * (c["encoder"] + c["memory"]) + s * c["policy"]
        # Stop decisions are taken after steps m-1 .. min(s, K-2).
        decisions = (torch.minimum(s, torch.tensor(k - 2.0)) - (m - 1) + 1).clamp(min=0) if self.stopping_enabled \
            else torch.zeros_like(s)
        if self.stop_rule == "confidence":
            # The classifier is the decision head; at the stop step its prediction is the output.
            at_stop = torch.where((s >= m - 1) & (s <= k - 2) & torch.tensor(self.stopping_enabled),
                                  torch.zeros_like(s), torch.ones_like(s))
            return cost + (decisions + at_stop) * c["classifier"]
        return cost + decisions * c["utility"] + c["classifier"]

    # ------------------------------------------------------------------------------------------- contract
    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Look at every frame, in order, with no policy and no stop (the static twin's behaviour)."""
        saved = self._all_on
        self._all_on = True
        try:
            yield
        finally:
            self._all_on = saved

    def to_static(self) -> StaticRecurrentClassifier:
        return StaticRecurrentClassifier(self.encoder, self.memory, self.classifier, steps=self.frames,
                                         step_shape=self.input_shape[1:])

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None, slots: int | None = None
                ) -> AdaFrameOutput:
        """Classify clips (B, T, C, H, W); see the module docstring for the modes.

        ``slots`` (execute mode only): process ``x`` as a *stream* with at most ``slots`` clips in flight
        (continuous batching, :meth:`_execute_stream`) instead of as one batch; same per-clip results.
        """
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        if slots is not None:
            if mode is not Mode.EXECUTE or self._all_on:
                raise ValueError("slots (streamed execution) applies to execute mode with the policy on only")
            return self._execute_stream(x, check_slots(slots))
        if self._all_on and mode is not Mode.TRAIN:
            return self._all_frames(x, mode)
        if mode is Mode.TRAIN:
            return self._train(x)
        if mode is Mode.SIMULATE:
            return self._simulate(x)
        return self._execute(x)

    def _all_frames(self, x: torch.Tensor, mode: Mode) -> AdaFrameOutput:
        b, t = x.shape[:2]
        logits = self.to_static()(x)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.static_cost)
        order = torch.arange(t, device=x.device).expand(b, t)
        return AdaFrameOutput(logits=logits, cost=ledger.flops, mode=mode, decisions={
            "frames": torch.ones(b, t, dtype=torch.bool, device=x.device),
            "exit_step": torch.full((b,), t - 1, dtype=torch.long, device=x.device), "frame_order": order.clone()})

    def _encode_all(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        return self.encoder(x.flatten(0, 1)).view(b, t, -1)  # (B, T, F)

    def _stop_score(self, h: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if self.stop_rule == "confidence":
            assert z is not None
            return z.float().softmax(-1).amax(-1)
        return -self.utility(h).squeeze(-1).float()

    def _train(self, x: torch.Tensor) -> AdaFrameOutput:
        b, k = x.shape[0], self.max_steps
        feats = self._encode_all(x)
        ar = torch.arange(b, device=x.device)
        nxt = torch.full((b,), self.start_frame, dtype=torch.long, device=x.device)
        seen = torch.zeros(b, self.frames, dtype=torch.bool, device=x.device)
        h, c = self.memory.zeros(b, feats)
        logits, logps, ents, utils = [], [], [], []
        for t in range(k):
            h, c = self.memory.step(feats[ar, nxt], (h, c))
            seen = seen.clone()
            seen[ar, nxt] = True
            logits.append(self.classifier(h))
            if t == k - 1:
                break
            hd = h.detach()  # the policy and utility learn to read the memory, not to reshape it
            utils.append(self.utility(hd).squeeze(-1))
            sample = sample_categorical(self.policy(hd).masked_fill(seen, _NEG))
            logps.append(sample.log_prob)
            ents.append(sample.entropy)
            nxt = sample.actions
        c_ = self.piece_flops()
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.frames * c_["encoder"] + k * (c_["memory"] + c_["classifier"])
                      + (k - 1) * (c_["policy"] + c_["utility"]))
        step_logits = torch.stack(logits, 1)
        empty = x.new_zeros(b, 0)
        return AdaFrameOutput(
            logits=step_logits[:, -1], cost=ledger.flops, mode=Mode.TRAIN,
            decisions={"frames": seen, "exit_step": torch.full((b,), k - 1, dtype=torch.long, device=x.device)},
            step_logits=step_logits, log_probs=torch.stack(logps, 1) if logps else empty,
            entropies=torch.stack(ents, 1) if ents else empty, utilities=torch.stack(utils, 1) if utils else empty)

    def _simulate(self, x: torch.Tensor) -> AdaFrameOutput:
        """Encode every frame, follow the greedy trajectory for K steps, then apply each sample's stop step."""
        b, k = x.shape[0], self.max_steps
        feats = self._encode_all(x)
        ar = torch.arange(b, device=x.device)
        nxt = torch.full((b,), self.start_frame, dtype=torch.long, device=x.device)
        seen = torch.zeros(b, self.frames, dtype=torch.bool, device=x.device)
        order = torch.empty(b, k, dtype=torch.long, device=x.device)
        scores = torch.full((b, k), float("-inf"), device=x.device)
        h, c = self.memory.zeros(b, feats)
        logits = []
        for t in range(k):
            h, c = self.memory.step(feats[ar, nxt], (h, c))
            order[:, t] = nxt
            seen[ar, nxt] = True
            z = self.classifier(h)
            logits.append(z)
            if t == k - 1:
                break
            if self.stopping_enabled and t >= self.min_steps - 1:
                scores[:, t] = self._stop_score(h, z)
            nxt = self.policy(h).masked_fill(seen, float("-inf")).argmax(-1)
        step_logits = torch.stack(logits, 1)
        stop = first_exit_step(scores, float(self.stop_threshold), min_steps=self.min_steps)
        out_logits = step_logits[ar, stop]
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.path_costs().to(x.device)[stop])
        taken = torch.arange(k, device=x.device)[None] <= stop[:, None]
        order = order.masked_fill(~taken, -1)
        frames = torch.zeros(b, self.frames + 1, dtype=torch.bool, device=x.device)
        frames[ar[:, None].expand(b, k), torch.where(taken, order, self.frames)] = True
        return AdaFrameOutput(logits=out_logits, cost=ledger.flops, mode=Mode.SIMULATE,
                              decisions={"frames": frames[:, :-1], "exit_step": stop, "frame_order": order},
                              step_logits=step_logits, stop_scores=scores)

    def _execute(self, x: torch.Tensor) -> AdaFrameOutput:
        """Step by step on the samples still looking; a frame is encoded only by the samples that chose it."""
        b, k = x.shape[0], self.max_steps
        c_ = self.piece_flops()
        thr = float(self.stop_threshold)
        stopping = self.stopping_enabled
        ar = torch.arange(b, device=x.device)
        rows = ar
        nxt = torch.full((b,), self.start_frame, dtype=torch.long, device=x.device)
        seen = torch.zeros(b, self.frames, dtype=torch.bool, device=x.device)
        order = torch.full((b, k), -1, dtype=torch.long, device=x.device)
        exit_step = torch.full((b,), k - 1, dtype=torch.long, device=x.device)
        out = x.new_empty(b, self.num_classes)
        ledger = CostLedger.zeros(b, device=x.device)
        h, c = self.memory.zeros(b, x)
        frames = x.reshape(b * self.frames, *x.shape[2:])  # (B·T, C, H, W): a view of a contiguous batch
        for t in range(k):
            full = rows.numel() == b
            charge_rows = None if full else rows
            # Gather only the chosen frame of each sample still looking: (n, C, H, W).
            flat = rows * self.frames + nxt  # (sample, frame) as a row of (B·T)
            h, c = self.memory.step(self.encoder(frames.index_select(0, flat)), (h, c))
            ledger.charge(c_["encoder"] + c_["memory"], charge_rows)
            order.select(1, t).index_copy_(0, rows, nxt)
            seen.view(-1).index_fill_(0, flat, True)
            if t == k - 1:
                out.index_copy_(0, rows, self.classifier(h))
                ledger.charge(c_["classifier"], charge_rows)
                exit_step.index_fill_(0, rows, t)
                break
            if stopping and t >= self.min_steps - 1:
                z = self.classifier(h) if self.stop_rule == "confidence" else None
                ledger.charge(c_["classifier"] if z is not None else c_["utility"], charge_rows)
                stop = self._stop_score(h, z) >= thr
                n_stop = int(stop.sum())  # one host sync per step
                if n_stop:
                    sel = stop.nonzero().squeeze(1)
                    dest = rows.index_select(0, sel)
                    if z is None:
                        zs = self.classifier(h.index_select(0, sel))
                        ledger.charge(c_["classifier"], dest)
                    else:
                        zs = z.index_select(0, sel)
                    out.index_copy_(0, dest, zs)
                    exit_step.index_fill_(0, dest, t)
                    if n_stop == stop.numel():
                        break
                    keep = (~stop).nonzero().squeeze(1)
                    # Compaction: the samples that stopped leave; their unseen frames are never encoded.
                    h, c, rows = h.index_select(0, keep), c.index_select(0, keep), rows.index_select(0, keep)
            ledger.charge(c_["policy"], None if rows.numel() == b else rows)
            nxt = self.policy(h).masked_fill(seen.index_select(0, rows), float("-inf")).argmax(-1)
        return AdaFrameOutput(logits=out, cost=ledger.flops, mode=Mode.EXECUTE,
                              decisions={"frames": seen, "exit_step": exit_step, "frame_order": order})

    def _execute_stream(self, x: torch.Tensor, slots: int) -> AdaFrameOutput:
        """Execute over a stream of clips with continuous batching: at most ``slots`` clips are in flight, each at
        its own step; a clip that stops frees its slot and the next clip of ``x`` takes it at the next step.

        A clip's computation does not depend on the other clips in its batch (the encoder, memory and heads act
        row by row), so each clip gets exactly what :meth:`_execute` computes for it: the same frames, stop step,
        prediction (up to float summation order in batched kernels) and cost. What changes is the batching:
        plain execution of a batch keeps stepping for its slowest clip on an ever smaller sub-batch (every step
        pays the kernels' per-call floors for a handful of rows), while here every step runs on a full set of
        ``slots`` rows until the stream drains. This is how a server would run the model on a stream of requests
        (Orca-style continuous batching, Yu et al., OSDI 2022); throughput, not the latency of one batch, is
        what it improves.
        """
        n, k, frames_per_clip = x.shape[0], self.max_steps, self.frames
        dev = x.device
        thr = float(self.stop_threshold)
        stopping = self.stopping_enabled
        frames = x.reshape(n * frames_per_clip, *x.shape[2:])
        seen = torch.zeros(n, frames_per_clip, dtype=torch.bool, device=dev)
        order = torch.full((n, k), -1, dtype=torch.long, device=dev)
        exit_step = torch.full((n,), k - 1, dtype=torch.long, device=dev)
        out = x.new_empty(n, self.num_classes)
        # Per-slot state: the clip it holds, its step, next frame, memory.
        idx = torch.zeros(0, dtype=torch.long, device=dev)
        step = torch.zeros(0, dtype=torch.long, device=dev)
        nxt = torch.zeros(0, dtype=torch.long, device=dev)
        h, c = self.memory.zeros(0, x)
        admitted = 0
        while admitted < n or idx.numel():
            free = min(slots - idx.numel(), n - admitted)
            if free > 0:  # new clips take the free slots, at their first step
                new = torch.arange(admitted, admitted + free, device=dev)
                h0, c0 = self.memory.zeros(free, x)
                idx, step = torch.cat([idx, new]), torch.cat([step, torch.zeros_like(new)])
                nxt = torch.cat([nxt, torch.full_like(new, self.start_frame)])
                h, c = torch.cat([h, h0]), torch.cat([c, c0])
                admitted += free
            flat = idx * frames_per_clip + nxt
            h, c = self.memory.step(self.encoder(frames.index_select(0, flat)), (h, c))
            order.view(-1).index_copy_(0, idx * k + step, nxt)
            seen.view(-1).index_fill_(0, flat, True)
            last = step == k - 1
            done = last
            z: torch.Tensor | None = None
            if stopping:
                may = (step >= self.min_steps - 1) & ~last
                if self.stop_rule == "confidence":
                    z = self.classifier(h)  # the decision head, and the output of the rows that stop
                    score = self._stop_score(h, z)
                else:
                    rows = may.nonzero().squeeze(1)  # the utility is computed where a decision is taken only
                    score = torch.full_like(h[:, 0], float("-inf")).index_copy_(
                        0, rows, self._stop_score(h.index_select(0, rows), None))
                done = last | (may & (score >= thr))
            fin = done.nonzero().squeeze(1)
            if fin.numel():  # one host sync per step
                retire_rows(out, exit_step, idx, step, fin, z.index_select(0, fin) if z is not None
                            else self.classifier(h.index_select(0, fin)))
                keep = (~done).nonzero().squeeze(1)
                idx, step, h, c = (t.index_select(0, keep) for t in (idx, step, h, c))
                if not idx.numel():
                    nxt = idx
                    continue
            nxt = self.policy(h).masked_fill(seen.index_select(0, idx), float("-inf")).argmax(-1)
            step = step + 1
        ledger = CostLedger.zeros(n, device=dev)
        ledger.charge(self.path_costs().to(dev)[exit_step])  # each clip's analytic path cost: what it ran
        return AdaFrameOutput(logits=out, cost=ledger.flops, mode=Mode.EXECUTE,
                              decisions={"frames": seen, "exit_step": exit_step, "frame_order": order})

    # ------------------------------------------------------------------------------------ training, budget
    def training_loss(self, out: AdaFrameOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy after every step + ``policy_weight`` × (REINFORCE on the frame choices with the utility
        network as learned baseline, which also trains the utility to predict the future reward)."""
        if out.step_logits is None or out.log_probs is None or out.utilities is None or out.entropies is None:
            raise ValueError("training_loss needs a train-mode output")
        b, k, _ = out.step_logits.shape
        ce = F.cross_entropy(out.step_logits.flatten(0, 1), y.repeat_interleave(k))
        parts = {"ce": ce.detach()}
        loss = ce
        if k > 1:
            _, returns = adaframe_rewards(out.step_logits, y, gamma=self.gamma)
            sample = PolicySample(actions=torch.zeros(b * (k - 1), dtype=torch.long, device=y.device),
                                  log_prob=out.log_probs.flatten(), entropy=out.entropies.flatten())
            rl = self.reinforce(sample, returns.flatten(), value=out.utilities.flatten())
            loss = loss + self.policy_weight * rl["loss"]
            parts.update(policy_loss=rl["policy_loss"], utility_loss=rl["baseline_loss"], entropy=rl["entropy"],
                         mean_return=returns.mean().detach())
        return {"loss": loss, **parts}

    @torch.no_grad()
    def stop_scores(self, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """(N, K) stop scores along the greedy trajectory (-inf where no decision is taken)."""
        was = self.training
        self.eval()
        saved = self.stop_threshold.clone()
        self.stop_threshold.fill_(0.0)
        try:
            parts = [self(x[i:i + batch_size], mode="simulate").stop_scores for i in range(0, x.shape[0], batch_size)]
        finally:
            self.stop_threshold.copy_(saved)
            self.train(was)
        return torch.cat(parts)  # type: ignore[arg-type]

    def calibrate(self, x: torch.Tensor, *, budget: float, unit: Literal["fraction", "frames"] = "fraction",
                  batch_size: int = 256) -> KnobCalibration:
        """Fit ``stop_threshold`` so that the mean cost on ``x`` meets ``budget`` (a fraction of the static FLOPs,
        or a mean number of frames looked at); offline from one pass of stop scores (the greedy trajectory does
        not depend on the threshold)."""
        saved = self.stop_threshold.clone()
        self.stop_threshold.fill_(0.0)  # any finite value: costs with stopping enabled
        path = self.path_costs() / self.static_cost
        self.stop_threshold.copy_(saved)
        scores = self.stop_scores(x, batch_size=batch_size)

        def mean_cost(thr: float) -> float:
            step = first_exit_step(scores, thr, min_steps=self.min_steps)
            return float(path[step].mean()) if unit == "fraction" else float((step + 1).double().mean())

        finite = scores[torch.isfinite(scores)]
        return calibrate_knob(mean_cost=mean_cost, set_knob=lambda v: self.stop_threshold.fill_(float(v)),
                              budget=budget, lo=float(finite.min()), hi=float(finite.max()) + 1e-3, unit=unit,
                              current=float(self.stop_threshold))


@register_model
def adaframe_moving_digits(*, frames: int = 10, size: int = 32, widths: tuple[int, ...] = (16, 32, 64),
                           hidden: int = 64, num_classes: int = 10, max_steps: int | None = None,
                           start_frame: int | None = None, stop_rule: Literal["utility", "confidence"] = "utility",
                           stop_threshold: float = float("inf"), min_steps: int = 1, gamma: float = 0.9,
                           entropy_coef: float = 0.01, policy_weight: float = 1.0) -> AdaFrame:
    """AdaFrame on moving-digits clips (B, 10, 1, 32, 32): 3-layer CNN per frame, LSTM 64."""
    return AdaFrame(frames=frames, size=size, widths=widths, hidden=hidden, num_classes=num_classes,
                    max_steps=max_steps, start_frame=start_frame, stop_rule=stop_rule, stop_threshold=stop_threshold,
                    min_steps=min_steps, gamma=gamma, entropy_coef=entropy_coef, policy_weight=policy_weight)


@register_model
def test_adaframe(*, stop_rule: Literal["utility", "confidence"] = "utility", stop_threshold: float | None = None
                  ) -> AdaFrame:
    """Tiny variant for tests: 4 frames of 1×16×16, 3 classes. Unless ``stop_threshold`` is given, the threshold is
    calibrated at init on a fixed random batch to 60 % of the static cost, so samples stop at different steps."""
    model = AdaFrame(frames=4, size=16, widths=(4, 8), hidden=8, num_classes=3, stop_rule=stop_rule,
                     stop_threshold=0.0 if stop_threshold is None else stop_threshold)
    if stop_threshold is None:
        with torch.no_grad():
            model.utility[-1].weight.mul_(20.0)  # spread the random-init utilities across samples
        model.calibrate(model.example_input(64, generator=torch.Generator().manual_seed(123)), budget=0.6)
    return model
