"""Generic multi-exit network: any sequence of stages, exit classifiers after chosen stages.

The early-exit idea (BranchyNet, Teerapittayanon et al., ICPR 2016, arXiv:1709.01686; SDN, Kaya et al., ICML 2019,
arXiv:1810.07052; MSDNet, Huang et al., ICLR 2018, arXiv:1703.09844): a sample leaves the network at the first
exit whose classifier is confident enough, and the later stages are never run for it.

Modes (see :mod:`dynaneural.execution`):

* train — every stage and every exit for every sample (for the multi-exit loss);
* simulate — the same full computation, then each sample's exit is chosen from its scores, and its logits and
  cost are gathered: the reference semantics;
* execute — stage by stage on a shrinking batch: after each enabled exit the samples that stop have their
  logits scattered into the output, and only the others are gathered (``index_select``) and passed on. The
  later stages never see the samples that left. Costs are charged to the ledger for exactly the rows run.
  With ``slots=n`` a whole stream of inputs runs through per-exit queues instead
  (:meth:`MultiExitNetwork._execute_stream`): each segment of stages runs on ``n`` queued rows at a time, so the
  deep stages see full batches instead of the few survivors of one batch; each input gets the same result.

An exit whose threshold is ``+inf`` is *disabled*: it never fires, so its classifier is not even evaluated
(in every mode's cost accounting and in execute mode's computation). With every intermediate exit disabled the
network is its static twin (:meth:`MultiExitNetwork.to_static`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynaneural.compute.flops import static_flops
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import DynamicModel
from dynaneural.execution import Mode, check_slots, scatter_exits, tree_cat, tree_index_select, tree_slice
from dynaneural.outputs import EarlyExitOutput
from dynaneural.policies.exit_rules import ExitPolicyHead, ExitRule, create_exit_rule
from dynaneural.validation import check_batch

__all__ = ["MultiExitNetwork", "ExitCostProfile", "StaticChain"]


@dataclass(frozen=True)
class ExitCostProfile:
    """Static FLOPs per sample of the pieces of a multi-exit network, for one input shape.

    Attributes:
        stage: FLOPs of each stage.
        head: FLOPs of each exit classifier.
        policy: FLOPs of each exit's learned-policy head (0 where there is none).
        exit_stage: the stage each exit follows.
    """

    stage: tuple[float, ...]
    head: tuple[float, ...]
    policy: tuple[float, ...]
    exit_stage: tuple[int, ...]

    @property
    def num_exits(self) -> int:
        return len(self.head)

    @property
    def static_total(self) -> float:
        """The static twin: every stage and the final classifier only."""
        return sum(self.stage) + self.head[-1]

    def path_costs(self, enabled: torch.Tensor | Sequence[bool], *, with_policy: bool = False) -> torch.Tensor:
        """(K,) float64 FLOPs paid by a sample that leaves at exit k, given which exits are enabled.

        A sample leaving at k ran stages 0..exit_stage[k], every enabled classifier up to k, and (with a learned
        policy) the policy head of every enabled exit up to k, except the last enabled exit's (nothing to decide).
        """
        enabled_list = [bool(e) for e in enabled]
        last = max(i for i, e in enumerate(enabled_list) if e)
        cum_stage = torch.tensor(self.stage, dtype=torch.float64).cumsum(0)
        out = torch.zeros(self.num_exits, dtype=torch.float64)
        paid = 0.0
        for k in range(self.num_exits):
            if enabled_list[k]:
                paid += self.head[k]
                if with_policy and k != last:  # the policy decided this exit, whether the sample left or not
                    paid += self.policy[k]
                out[k] = cum_stage[self.exit_stage[k]] + paid
            else:
                out[k] = float("nan")
        return out


class StaticChain(nn.Module):
    """The static twin of a multi-exit network: its stages and final classifier, same weights, no decisions."""

    def __init__(self, stages: nn.ModuleList, head: nn.Module) -> None:
        super().__init__()
        self.stages = stages
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: Any = x
        for stage in self.stages:
            h = stage(h)
        return self.head(h)


@dataclass(frozen=True)
class _ExitPlan:
    """Thresholds of one forward, with the Python views execute mode reads per exit (no tensor op per call)."""

    thr: torch.Tensor  # (K,) float32 on the CPU; +inf = disabled, the last is -inf
    enabled: torch.Tensor  # (K,) bool
    enabled_list: tuple[bool, ...]
    thr_list: tuple[float, ...]
    last: int  # the last enabled exit

    @classmethod
    def of(cls, thr: torch.Tensor) -> _ExitPlan:
        enabled = thr != float("inf")
        enabled_list = tuple(bool(e) for e in enabled.tolist())
        return cls(thr, enabled, enabled_list, tuple(thr.tolist()),
                   max(i for i, e in enumerate(enabled_list) if e))


class MultiExitNetwork(DynamicModel):
    """A network of stages with exit classifiers after some of them.

    Args:
        stages: the backbone, run in order; stage ``s`` maps the state after stage ``s-1`` (a tensor or a list
            of tensors, e.g. multi-scale features) to the next state.
        heads: exit classifiers by the index of the stage they follow; must include the last stage.
        num_classes: classes predicted by every head.
        input_shape: shape of one input sample, (C, H, W) for images.
        exit_policy: also build a learned exit-policy head per intermediate exit (for the ``learned`` rule).
        config: the constructor arguments of the concrete model, saved with checkpoints.
    """

    def __init__(self, *, stages: Sequence[nn.Module], heads: Mapping[int, nn.Module], num_classes: int,
                 input_shape: Sequence[int], exit_policy: bool = False, config: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__()
        if not stages:
            raise ValueError("a multi-exit network needs at least one stage")
        exit_stage = sorted(int(s) for s in heads)
        if not exit_stage or exit_stage[-1] != len(stages) - 1:
            raise ValueError(f"heads must include the last stage ({len(stages) - 1}); got stages {exit_stage}")
        if exit_stage[0] < 0:
            raise ValueError(f"head stage indices must be non-negative, got {exit_stage}")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads[s] for s in exit_stage)
        self.exit_stage: tuple[int, ...] = tuple(exit_stage)
        self._exit_after = {stage: k for k, stage in enumerate(exit_stage)}  # stage index -> exit index
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.config: dict[str, Any] = dict(config or {})
        self.policy_heads = (
            nn.ModuleList(ExitPolicyHead(num_classes) for _ in exit_stage[:-1]) if exit_policy else None
        )
        k = len(exit_stage)
        # Calibrated thresholds travel with the weights. Default: every intermediate exit disabled (static net).
        with torch.inference_mode(False):  # a normal tensor even when built under inference mode (see _default_plan)
            thresholds = torch.full((k,), float("inf"))
            thresholds[-1] = float("-inf")
        self.register_buffer("exit_thresholds", thresholds)
        self.exit_rule: ExitRule = create_exit_rule("confidence")
        self._profiles: dict[tuple[int, ...], ExitCostProfile] = {}

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def configure_exits(self, *, rule: str | ExitRule | dict[str, Any], thresholds: Sequence[float] | torch.Tensor
                        ) -> None:
        """Set the exit rule and per-exit thresholds (+inf disables an exit; the last exit always fires)."""
        rule = create_exit_rule(rule)
        if rule.needs_policy and self.policy_heads is None:
            raise ValueError(f"rule {rule.name!r} needs a model built with exit_policy=True")
        t = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        if t.numel() != self.num_exits:
            raise ValueError(f"expected {self.num_exits} thresholds, got {t.numel()}")
        if torch.isnan(t).any():
            raise ValueError("thresholds must not be NaN (use +inf to disable an exit)")
        t = t.clone()
        t[-1] = float("-inf")
        self.exit_rule = rule
        self.exit_thresholds.copy_(t.to(self.exit_thresholds.device))

    def disable_exits(self) -> None:
        """Run every sample to the final classifier (the static twin's behaviour)."""
        self.configure_exits(rule=self.exit_rule, thresholds=[float("inf")] * self.num_exits)

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Every intermediate exit disabled inside the context (the static twin's behaviour); restored after."""
        saved = (self.exit_rule, self.exit_thresholds.clone())
        self.disable_exits()
        try:
            yield
        finally:
            self.configure_exits(rule=saved[0], thresholds=saved[1])

    def to_static(self) -> StaticChain:
        """The static twin (shares this network's modules)."""
        return StaticChain(self.stages, self.heads[-1])

    def measure_pieces(self, x: Any, measure: Callable[[nn.Module, Any], float]) -> ExitCostProfile:
        """Walk the network once in eval mode on ``x`` and apply ``measure(module, its_input)`` to every stage,
        exit classifier and policy head: the one walk behind both the FLOPs profile and the latency profile."""
        was_training = self.training
        self.eval()  # never let a measuring pass touch batch-norm statistics
        stage_c, head_c, policy_c = [], [], []
        try:
            with torch.no_grad():
                h: Any = x
                for s, stage in enumerate(self.stages):
                    stage_c.append(measure(stage, h))
                    h = stage(h)
                    if s in self.exit_stage:
                        k = self.exit_stage.index(s)
                        head_c.append(measure(self.heads[k], h))
                        pol = self.policy_heads[k] if self.policy_heads is not None and k < self.num_exits - 1 else None
                        policy_c.append(measure(pol, self.heads[k](h)) if pol is not None else 0.0)
        finally:
            self.train(was_training)
        return ExitCostProfile(tuple(stage_c), tuple(head_c), tuple(policy_c), self.exit_stage)

    def cost_profile(self, input_shape: Sequence[int] | None = None) -> ExitCostProfile:
        """Static FLOPs of each stage and head for one input shape (counted once, then cached)."""
        shape = tuple(input_shape or self.input_shape)
        if shape not in self._profiles:
            p = next(self.parameters())
            self._profiles[shape] = self.measure_pieces(torch.zeros((1, *shape), dtype=p.dtype, device=p.device),
                                                        static_flops)
        return self._profiles[shape]

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None, rule: str | ExitRule | None = None,
                thresholds: Sequence[float] | torch.Tensor | None = None, max_flops: float | None = None,
                max_seconds: float | None = None, validate: bool = True, track_parts: bool = False,
                slots: int | None = None) -> EarlyExitOutput:
        """Classify a batch.

        Args:
            x: (B, *input_shape) floating-point batch.
            mode: ``train``, ``simulate`` or ``execute``; default ``train`` in training mode, else ``execute``.
            rule: exit rule overriding the configured one.
            thresholds: (K,) thresholds overriding the calibrated ones.
            max_flops: anytime deadline: exits whose path costs more are not taken; every sample still running at
                the deepest affordable exit leaves there (the best prediction available by the deadline).
            max_seconds: wall-clock anytime deadline (execute mode only): once it has passed, the samples still
                running leave at the next exit (disabled ones included). Non-deterministic by nature.
            validate: check shape, dtype, emptiness and finiteness of ``x`` first.
            track_parts: also return per-sample cost by part (stage/exit) — for ledgers and plots.
            slots: execute mode only: run ``x`` as a stream through per-exit queues, each segment of stages on
                ``slots`` rows at a time (:meth:`_execute_stream`); same per-input results as one execute call.
        """
        mode = Mode.parse(mode) if mode is not None else (Mode.TRAIN if self.training else Mode.EXECUTE)
        if validate:
            check_batch(x, input_shape=self.input_shape)
        rule_obj = create_exit_rule(rule) if rule is not None else self.exit_rule
        if rule_obj.needs_policy and self.policy_heads is None:
            raise ValueError(f"rule {rule_obj.name!r} needs a model built with exit_policy=True")
        profile = self.cost_profile(tuple(x.shape[1:]))
        if thresholds is None and max_flops is None:
            plan = self._default_plan()
        else:
            thr = (torch.as_tensor(thresholds, dtype=torch.float32).flatten().cpu()
                   if thresholds is not None else self.exit_thresholds.detach().float().cpu())
            if thr.numel() != self.num_exits:
                raise ValueError(f"expected {self.num_exits} thresholds, got {thr.numel()}")
            thr = thr.clone()
            thr[-1] = float("-inf")
            if max_flops is not None:
                thr = self._apply_deadline(thr, profile, float(max_flops), rule_obj.needs_policy)
            plan = _ExitPlan.of(thr)
        if slots is not None:
            if mode is not Mode.EXECUTE:
                raise ValueError("slots (streamed execution) applies to execute mode only")
            if max_seconds is not None or track_parts:
                raise ValueError("streamed execution (slots) supports neither max_seconds nor track_parts")
            return self._execute_stream(x, rule_obj, plan, profile, check_slots(slots))
        if mode is Mode.EXECUTE:
            if max_seconds is not None and max_seconds <= 0:
                raise ValueError("max_seconds must be positive")
            return self._execute(x, rule_obj, plan, profile, max_seconds, track_parts)
        if max_seconds is not None:
            raise ValueError("max_seconds (a wall-clock deadline) only applies in execute mode")
        return self._full(x, mode, rule_obj, plan, profile, track_parts)

    def _default_plan(self) -> _ExitPlan:
        """The configured thresholds as a plan, cached until the buffer changes (its version counter moves on
        every in-place write, ``load_state_dict`` included): saves a few tensor ops per call at batch 1."""
        t = self.exit_thresholds
        # An inference tensor (a buffer swapped in under inference mode) has no version counter: no caching.
        key = None if t.is_inference() else (t._version, t.data_ptr())
        if key is None or getattr(self, "_plan_key", None) != key:
            thr = self.exit_thresholds.detach().float().cpu().clone()
            thr[-1] = float("-inf")
            self._plan, self._plan_key = _ExitPlan.of(thr), key
        return self._plan

    def _apply_deadline(self, thr: torch.Tensor, profile: ExitCostProfile, max_flops: float, with_policy: bool
                        ) -> torch.Tensor:
        """Thresholds for an anytime deadline: the deepest exit whose path fits the deadline becomes the final
        one (enabled even if calibration had disabled it); exits after it are disabled."""
        on = (thr != float("inf")).tolist()
        for k in range(self.num_exits - 1, -1, -1):
            enabled = on[:k] + [True] + [False] * (self.num_exits - 1 - k)
            if float(profile.path_costs(enabled, with_policy=with_policy)[k]) <= max_flops:
                out = thr.clone()
                out[k + 1:] = float("inf")
                out[k] = float("-inf")
                return out
        cheapest = float(profile.path_costs([True] + [False] * (self.num_exits - 1), with_policy=with_policy)[0])
        raise ValueError(f"max_flops={max_flops:g} is below the cheapest exit's cost {cheapest:g} FLOPs: no "
                         "prediction can be made by that deadline")

    def _policy_logit(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        assert self.policy_heads is not None
        # Detached: the policy learns to read the exit, it must not bend the classifier toward being readable.
        return self.policy_heads[k](logits.detach())

    def _full(self, x: torch.Tensor, mode: Mode, rule: ExitRule, plan: _ExitPlan, profile: ExitCostProfile,
              track_parts: bool) -> EarlyExitOutput:
        """Train / simulate: every stage and exit for every sample."""
        thr, enabled = plan.thr.to(x.device), plan.enabled
        b = x.shape[0]
        h: Any = x
        exit_logits: list[torch.Tensor] = []
        policy_logits: list[torch.Tensor] | None = [] if self.policy_heads is not None else None
        for s, stage in enumerate(self.stages):
            h = stage(h)
            if s in self.exit_stage:
                k = self.exit_stage.index(s)
                exit_logits.append(self.heads[k](h))
                if policy_logits is not None and k < self.num_exits - 1:
                    policy_logits.append(self._policy_logit(k, exit_logits[-1]))
        with_policy = rule.needs_policy
        if mode is Mode.TRAIN:
            all_on = torch.ones(self.num_exits, dtype=torch.bool)
            cost = profile.path_costs(all_on, with_policy=policy_logits is not None)[-1]
            ledger = CostLedger.zeros(b, device=x.device)
            ledger.charge(float(cost))
            return EarlyExitOutput(logits=exit_logits[-1], cost=ledger.flops,
                                   decisions={"exit": torch.full((b,), self.num_exits - 1, device=x.device)},
                                   mode=mode, exit_logits=exit_logits, policy_logits=policy_logits)
        # Simulate: scores of the enabled exits in order, then the first exit whose score reaches its threshold.
        scores = torch.full((b, self.num_exits), float("nan"), device=x.device)
        state = rule.init_state(b, x.device)
        exit_index = torch.full((b,), -1, dtype=torch.long, device=x.device)
        for k in range(self.num_exits):
            if not bool(enabled[k]):
                continue
            pl = policy_logits[k] if (with_policy and policy_logits is not None and k < self.num_exits - 1) else None
            if k == self.num_exits - 1 or thr[k] == float("-inf"):
                stop = torch.ones(b, dtype=torch.bool, device=x.device)
                if pl is not None or not rule.needs_policy:
                    scores[:, k], state = rule.score(exit_logits[k], state, policy_logit=pl)
            else:
                scores[:, k], state = rule.score(exit_logits[k], state, policy_logit=pl)
                stop = scores[:, k] >= thr[k]
            exit_index = torch.where((exit_index < 0) & stop, torch.full_like(exit_index, k), exit_index)
        stacked = torch.stack(exit_logits, 1)  # (B, K, C)
        logits = stacked.gather(1, exit_index.view(b, 1, 1).expand(b, 1, stacked.shape[-1])).squeeze(1)
        path = profile.path_costs(enabled.cpu(), with_policy=with_policy).to(x.device)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(path[exit_index])
        reached: list[torch.Tensor | None] = [  # what execute mode scores: enabled exits before the last one
            scores[exit_index >= k, k] if plan.enabled_list[k] and k < plan.last else None
            for k in range(self.num_exits)]
        return EarlyExitOutput(logits=logits, cost=ledger.flops, decisions={"exit": exit_index}, mode=mode,
                               exit_logits=exit_logits, exit_scores=scores, policy_logits=policy_logits,
                               reached_scores=reached)

    def _execute(self, x: torch.Tensor, rule: ExitRule, plan: _ExitPlan, profile: ExitCostProfile,
                 max_seconds: float | None, track_parts: bool) -> EarlyExitOutput:
        """Execute: run each stage on the samples still active only; scatter exits back in input order.

        While no sample has left, nothing is gathered or scattered: the batch runs as it came, and if everyone
        leaves at one exit (always the case at batch 1, or with every exit disabled) that exit's logits are the
        output as they are. So the machinery's overhead over the static twin is a few Python calls per forward.
        """
        start = time.perf_counter() if max_seconds is not None else 0.0
        b = x.shape[0]
        device = x.device
        ledger = CostLedger.zeros(b, device=device, track_parts=track_parts)
        exit_after = self._exit_after
        enabled_list, thr_list, last = plan.enabled_list, plan.thr_list, plan.last
        with_policy = rule.needs_policy
        logits_out: torch.Tensor | None = None  # created at the first partial exit
        exit_index: torch.Tensor | None = None
        active: torch.Tensor | None = None  # None means "all samples, in order": no gather needed yet
        state = rule.init_state(b, device)
        reached: list[torch.Tensor | None] = [None] * self.num_exits
        h: Any = x
        for s, stage in enumerate(self.stages):
            h = stage(h)
            ledger.charge(profile.stage[s], active, part=f"stage{s}" if track_parts else "")
            k = exit_after.get(s)
            if k is None:
                continue
            deadline_hit = max_seconds is not None and time.perf_counter() - start >= max_seconds
            if not enabled_list[k] and not deadline_hit:  # past the deadline any exit will do, even a disabled one
                continue
            logits = self.heads[k](h)
            ledger.charge(profile.head[k], active, part=f"exit{k}" if track_parts else "")
            everyone = k == last or deadline_hit
            if not everyone:
                pl = None
                if with_policy:
                    pl = self._policy_logit(k, logits)
                    ledger.charge(profile.policy[k], active, part=f"policy{k}")
                score, state = rule.score(logits, state, policy_logit=pl)
                reached[k] = score
                stop = score >= thr_list[k]
                n_stop = int(stop.sum())  # the one host sync per exit
                if n_stop == 0:
                    continue
                everyone = n_stop == stop.numel()
            if everyone:  # everyone still running leaves here: no gather
                if logits_out is None:  # nobody left before: these logits are the output, in input order
                    return EarlyExitOutput(logits=logits, cost=ledger.flops,
                                           decisions={"exit": torch.full((b,), k, dtype=torch.long, device=device)},
                                           mode=Mode.EXECUTE, cost_by_part=ledger.by_part, reached_scores=reached)
                assert exit_index is not None
                scatter_exits(logits_out, exit_index, active, None, logits, k)
                break
            if logits_out is None:
                logits_out = logits.new_empty((b, logits.shape[-1]))
                exit_index = torch.full((b,), last, dtype=torch.long, device=device)
            assert exit_index is not None
            stop_idx = stop.nonzero().squeeze(1)
            scatter_exits(logits_out, exit_index, active, stop_idx, logits, k)
            keep = (~stop).nonzero().squeeze(1)
            # Compaction: the samples that left are dropped from the state; later stages never see them.
            h = tree_index_select(h, keep)
            state = tree_index_select(state, keep)
            active = keep if active is None else active.index_select(0, keep)
        assert logits_out is not None and exit_index is not None
        return EarlyExitOutput(logits=logits_out, cost=ledger.flops, decisions={"exit": exit_index},
                               mode=Mode.EXECUTE, cost_by_part=ledger.by_part, reached_scores=reached)

    def _execute_stream(self, x: torch.Tensor, rule: ExitRule, plan: _ExitPlan, profile: ExitCostProfile,
                        slots: int) -> EarlyExitOutput:
        """Execute a stream of inputs through per-exit queues (stage-level continuous batching).

        The stages between two enabled exits form a *segment*. Each segment has a queue of rows waiting for it:
        their index in ``x``, their state after the previous segment and their exit-rule state. The scheduler runs
        the deepest segment whose queue holds ``slots`` rows, on exactly ``slots`` of them; when none does, the
        next ``slots`` inputs are admitted to the first queue; once the input is exhausted the queues are flushed
        from the shallowest on (partial batches). After a segment, its exit classifier scores the rows: those that
        stop are written to the output, the others join the next queue.

        Plain execution of one batch runs the deep stages on the few survivors of that batch (after the first
        exit of a good early-exit network, 10-20 % of it), paying the kernels' per-call floor on tiny
        sub-batches; here every segment runs on ``slots`` rows until the stream drains. Each row's computation
        does not depend on the other rows (eval-mode layers), so every input gets what :meth:`_execute` computes
        for it: same exit, logits (up to float summation order in batched kernels) and cost. This raises
        throughput on a stream (Orca-style continuous batching, Yu et al., OSDI 2022, applied per stage), not the
        latency of one batch.
        """
        n, dev = x.shape[0], x.device
        exits = [k for k in range(self.num_exits) if plan.enabled_list[k]]  # one segment per enabled exit
        first_stage = [0] + [self.exit_stage[k] + 1 for k in exits[:-1]]
        segments = [range(a, self.exit_stage[k] + 1) for a, k in zip(first_stage, exits, strict=True)]
        with_policy = rule.needs_policy
        queues: list[list[tuple[torch.Tensor, Any, Any]]] = [[] for _ in exits]  # chunks of (rows, h, rule state)
        counts = [0] * len(exits)
        out: torch.Tensor | None = None
        exit_index = torch.full((n,), plan.last, dtype=torch.long, device=dev)
        admitted = 0

        def pop(j: int) -> tuple[torch.Tensor, Any, Any]:
            chunks, taken, need = queues[j], [], slots
            while need > 0 and chunks:
                rows, h, st = chunks.pop(0)
                if rows.numel() > need:  # split the chunk: the rest stays at the head of the queue
                    chunks.insert(0, (rows[need:], tree_slice(h, need), tree_slice(st, need)))
                    rows, h, st = rows[:need], tree_slice(h, None, need), tree_slice(st, None, need)
                taken.append((rows, h, st))
                need -= rows.numel()
            counts[j] -= slots - need
            rows, h, st = taken[0]
            for r, hh, ss in taken[1:]:
                rows, h, st = torch.cat([rows, r]), tree_cat(h, hh), tree_cat(st, ss)
            return rows, h, st

        while True:
            j = next((j for j in reversed(range(len(exits))) if counts[j] >= slots), None)
            if j is None and admitted < n:  # admit the next inputs at the first segment
                take = min(slots, n - admitted)
                queues[0].append((torch.arange(admitted, admitted + take, device=dev), x[admitted:admitted + take],
                                  rule.init_state(take, dev)))
                counts[0] += take
                admitted += take
                continue
            if j is None:  # input exhausted: flush the shallowest non-empty queue
                j = next((j for j in range(len(exits)) if counts[j]), None)
                if j is None:
                    break
            rows, h, st = pop(j)
            for s in segments[j]:
                h = self.stages[s](h)
            k = exits[j]
            logits = self.heads[k](h)
            if out is None:
                out = logits.new_empty((n, logits.shape[-1]))
            if k == plan.last:
                out.index_copy_(0, rows, logits)
                exit_index.index_fill_(0, rows, k)
                continue
            pl = self._policy_logit(k, logits) if with_policy else None
            score, st = rule.score(logits, st, policy_logit=pl)
            stop = score >= plan.thr_list[k]
            fin = stop.nonzero().squeeze(1)  # the one host sync per segment run
            if fin.numel():
                dest = rows.index_select(0, fin)
                out.index_copy_(0, dest, logits.index_select(0, fin))
                exit_index.index_fill_(0, dest, k)
            if fin.numel() < rows.numel():
                keep = (~stop).nonzero().squeeze(1)
                queues[j + 1].append((rows.index_select(0, keep), tree_index_select(h, keep),
                                      tree_index_select(st, keep)))
                counts[j + 1] += keep.numel()
        assert out is not None
        ledger = CostLedger.zeros(n, device=dev)
        ledger.charge(profile.path_costs(plan.enabled, with_policy=with_policy).to(dev)[exit_index])
        return EarlyExitOutput(logits=out, cost=ledger.flops, decisions={"exit": exit_index}, mode=Mode.EXECUTE)
