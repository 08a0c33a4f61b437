"""Running a residual network whose blocks are skipped per sample — the part SkipNet, ConvNet-AIG and BlockDrop share.

A skipped residual block is the identity: ``h ← h`` instead of ``h ← block(h)``. The three methods differ only in
*who decides* (a gate reading the block's input, an LSTM gate carried from block to block, or a policy network
that looks at the image once) and *how the decision is trained*; the way a decision is applied is the same, and
lives here (:class:`LayerSkipNetwork`):

* ``train`` — every block runs for every sample and its output is mixed with its input by the relaxed gate value
  ``v`` (straight-through or Gumbel, in [0, 1], hard in the forward pass): ``h ← h + v·(block(h) − h)``; gradients
  reach the gate and the block;
* ``simulate`` — every block runs for every sample, the hard decision selects ``block(h)`` or ``h``
  (``torch.where``): the reference semantics;
* ``execute`` — the rows whose gate is on are gathered, run through the block as a compact sub-batch and
  scattered back (:func:`dynaneural.execution.run_rows`); the others are never computed and keep ``h``.

Blocks that change the shape (the strided first block of a stage) have no identity to fall back on: they always run
(SkipNet, ConvNet-AIG and BlockDrop gate only the shape-preserving blocks too). Every sample pays, in the cost
ledger, the stem, the blocks it ran, the head, and the decision machinery it ran (the gates, or the policy
network): a gate is paid by every sample that reaches it, i.e. by every sample.

The inference knob is one threshold on the probability of "run": a block runs where ``p ≥ threshold`` (BlockDrop
and SkipNet use 0.5); :meth:`LayerSkipNetwork.calibrate` moves it to meet a FLOPs budget on validation data with
:func:`dynaneural.calibration.calibrate_knob`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynaneural.calibration.thresholds import KnobCalibration, calibrate_knob
from dynaneural.compute.flops import count_flops
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import DynamicModel, resolve_mode
from dynaneural.execution import Mode, rows_where, run_rows
from dynaneural.layers.resnet import CifarResNet, ResNetCosts, block_costs
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import Decision, PolicySample
from dynaneural.validation import check_batch

__all__ = ["LayerSkipNetwork", "LayerSkipOutput", "SkipCosts", "block_usage_by_class", "module_flops",
           "plot_block_usage"]


@dataclass
class LayerSkipOutput(DynamicOutput):
    """Output of a layer-skipping network.

    ``decisions["blocks"]`` is (B, L) bool: which of the L blocks each sample executed (the always-run blocks are
    True). The gate tensors cover the G gated blocks only, in order:

    Attributes:
        gate_prob: (B, G) probability of "run" of every gate (None inside ``all_on``).
        gate_value: (B, G) the value the blocks were mixed with: relaxed in train mode, the hard choice otherwise.
        policy: the sampled actions with their log-probability and entropy when the decisions were *sampled*
            (REINFORCE: SkipNet's RL stage, BlockDrop), else None.
        expected_cost: (B,) differentiable expected FLOPs under the gate probabilities (budget losses).
    """

    gate_prob: torch.Tensor | None = None
    gate_value: torch.Tensor | None = None
    policy: PolicySample | None = None
    expected_cost: torch.Tensor | None = None

    @property
    def blocks(self) -> torch.Tensor:
        return self.decisions["blocks"]


@dataclass(frozen=True)
class SkipCosts:
    """FLOPs per sample of every piece: the backbone's (:class:`~dynaneural.layers.resnet.ResNetCosts`), the
    decision run once per sample before the blocks (a policy network, else 0) and each gate (0 for none)."""

    net: ResNetCosts
    policy: float
    gates: tuple[float, ...]

    @property
    def static_total(self) -> float:
        return self.net.total

    @property
    def max_total(self) -> float:
        """Every block run, and every decision paid for: what a sample costs at most."""
        return self.net.total + self.policy + sum(self.gates)


class LayerSkipNetwork(DynamicModel):
    """A :class:`~dynaneural.layers.resnet.CifarResNet` whose shape-preserving blocks are skipped per sample.

    Subclasses say how decisions are made by overriding :meth:`begin` (decisions made once from the input; the
    returned state is passed to every gate), :meth:`gate_logit` (the logit of "run" for gated block ``k`` from its
    input ``h``) and :meth:`decide` (logit → :class:`~dynaneural.policies.Decision` in each mode), and say what
    the decision machinery costs with :meth:`decision_costs`.

    Args:
        backbone: the ResNet; it is owned (and trained further) by this model.
        threshold: the inference threshold on the probability of "run".
    """

    def __init__(self, backbone: CifarResNet, *, threshold: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_shape = backbone.input_shape
        self.num_classes = backbone.num_classes
        self.gated: tuple[bool, ...] = tuple(bool(b.is_identity_shape) for b in backbone.blocks)
        self.gate_blocks: tuple[int, ...] = tuple(i for i, g in enumerate(self.gated) if g)
        if not self.gate_blocks:
            raise ValueError("the backbone has no shape-preserving block to skip (use blocks_per_stage >= 2)")
        self.register_buffer("gate_threshold", torch.tensor(float(threshold)))
        self._force_on = False
        #: the train-mode expected cost counts a block by the decision's forward value (the hard decision, with
        #: the gradient of its probability under straight-through) instead of its probability. With a 0.5
        #: threshold, a probability-based budget is met by probabilities just above 0.5 while every block still
        #: runs: SkipNet's gates then learn no input dependence (session 6, CIFAR-10).
        self.budget_on_decisions = False
        # Named _profiles so that fold_batch_norms (which resets that attribute) makes the ledger recount.
        self._profiles: dict[Any, Any] = {}

    # ------------------------------------------------------------------------------------------ method hooks
    @property
    def num_gates(self) -> int:
        return len(self.gate_blocks)

    def begin(self, x: torch.Tensor, mode: Mode) -> tuple[Any, PolicySample | None]:
        """Decisions taken once from the input before the stem (BlockDrop's policy): the state passed to the gates,
        and the sampled actions when they were sampled. Default: no state."""
        return None, None

    def gate_logit(self, k: int, h: torch.Tensor, state: Any, mode: Mode) -> tuple[torch.Tensor, Any]:
        """(B,) logit of "run gated block k" given its input h (B, C, H, W), and the updated state."""
        raise NotImplementedError

    def decide(self, k: int, logit: torch.Tensor, state: Any, mode: Mode) -> tuple[Decision, PolicySample | None]:
        """Turn gate k's logits (B,) into a decision: the hard threshold outside train mode (this default), the
        method's relaxation or a REINFORCE sample in train mode (subclasses)."""
        return self.threshold_decision(logit), None

    def logit_cut(self) -> float:
        """The inference threshold as a logit: "run" where ``logit ≥ cut`` ⇔ ``sigmoid(logit) ≥ threshold``.

        Comparing logits rather than probabilities keeps the knob effective when a trained gate saturates (a
        float32 sigmoid returns exactly 1.0 above logit ≈ 17, and ``p ≥ 1.0`` would then ignore the threshold),
        so calibration can reach every budget between "only the forced blocks" (threshold 1) and "all" (0).
        """
        t = float(self.gate_threshold)
        return math.inf if t >= 1.0 else -math.inf if t <= 0.0 else math.log(t / (1.0 - t))

    def threshold_decision(self, logit: torch.Tensor) -> Decision:
        """The hard inference decision (B,) of logits (B,) at the calibrated threshold."""
        hard = logit >= self.logit_cut()
        return Decision(hard=hard, value=hard.to(logit.dtype), prob=torch.sigmoid(logit))

    def decision_costs(self, net: ResNetCosts) -> tuple[float, tuple[float, ...]]:
        """FLOPs per sample of (the policy run once, each of the G gates); ``net.block_inputs`` gives the shape
        each gate reads."""
        raise NotImplementedError

    def extra_losses(self, out: LayerSkipOutput) -> dict[str, torch.Tensor]:
        """Train-mode auxiliary losses (budget terms) from the output; default none."""
        return {}

    # ------------------------------------------------------------------------------------------ costs
    def costs(self) -> SkipCosts:
        """Per-piece FLOPs (counted once per model state, analytically, by the library's counter)."""
        cached = self._profiles.get("flops")
        if cached is None:
            net = block_costs(self.backbone)
            policy, gates = self.decision_costs(net)
            if len(gates) != self.num_gates:
                raise RuntimeError(f"decision_costs gave {len(gates)} gate costs for {self.num_gates} gates")
            cached = SkipCosts(net=net, policy=float(policy), gates=tuple(map(float, gates)))
            self._profiles["flops"] = cached
        return cached

    def _block_flops(self, costs: SkipCosts, device: torch.device) -> torch.Tensor:
        vec = self._profiles.get(("block_vec", str(device)))  # type: ignore[call-overload]
        if vec is None:
            vec = torch.tensor(costs.net.blocks, dtype=torch.float64, device=device)
            self._profiles[("block_vec", str(device))] = vec  # type: ignore[index]
        return vec

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> LayerSkipOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b, dev = x.shape[0], x.device
        costs = self.costs()
        net = self.backbone
        ledger = CostLedger.zeros(b, device=dev)
        blocks_run = torch.ones(b, len(net.blocks), dtype=torch.bool, device=dev)
        probs: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        samples: list[PolicySample] = []
        train = mode is Mode.TRAIN
        # Differentiable expected FLOPs under the gate probabilities (budget losses): train mode only.
        expected = torch.full((b,), costs.net.stem + costs.net.head, device=dev) if train else None

        state, first_sample = None, None
        if not self._force_on:
            state, first_sample = self.begin(x, mode)
            ledger.charge(costs.policy + sum(costs.gates), part="decisions")  # every sample reaches every gate
        ledger.charge(costs.net.stem, part="stem")
        h = net.stem(x)
        k = 0
        for i, block in enumerate(net.blocks):
            if not self.gated[i] or self._force_on:
                h = block(h)
                if expected is not None:
                    expected = expected + costs.net.blocks[i]
                continue
            logit, state = self.gate_logit(k, h, state, mode)
            decision, sample = self.decide(k, logit, state, mode)
            run = decision.hard  # (B,) bool
            blocks_run[:, i] = run
            probs.append(decision.prob)
            values.append(decision.value)
            if sample is not None:
                samples.append(sample)
            if expected is not None:
                used = decision.value.to(decision.prob.dtype) if self.budget_on_decisions else decision.prob
                expected = expected + costs.gates[k] + used * costs.net.blocks[i]
            if train:
                v = decision.value.to(h.dtype).view(b, 1, 1, 1)
                h = h + v * (block(h) - h)  # = block(h) where v = 1, h where v = 0; both get gradients
            elif mode is Mode.SIMULATE:
                h = torch.where(run.view(b, 1, 1, 1), block(h), h)
            else:
                # Only the rows that run the block are computed, and written back into the state in place (the
                # state is this forward's own tensor; with autograd recording it a copy is kept instead).
                h = run_rows(block, h, rows_where(run), inplace=not (torch.is_grad_enabled() and h.requires_grad))
            k += 1
        # Each sample pays for the blocks it ran: (B, L) bool @ (L,) FLOPs, one charge for all blocks.
        ledger.charge(blocks_run.to(torch.float64) @ self._block_flops(costs, dev), part="blocks")
        logits = net.head(h)
        ledger.charge(costs.net.head, part="head")
        out = LayerSkipOutput(
            logits=logits, cost=ledger.flops, decisions={"blocks": blocks_run}, mode=mode,
            gate_prob=torch.stack(probs, 1) if probs else None, gate_value=torch.stack(values, 1) if values else None,
            policy=first_sample or _merge(samples), expected_cost=expected)
        if mode is Mode.TRAIN and not self._force_on:
            out.aux_losses = self.extra_losses(out)
        return out

    # ------------------------------------------------------------------------------------------ contract
    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Every block runs and no decision is computed (nor paid): the static ResNet."""
        before = self._force_on
        self._force_on = True
        try:
            yield
        finally:
            self._force_on = before

    def to_static(self) -> CifarResNet:
        """The backbone ResNet with these weights, run fully."""
        return copy.deepcopy(self.backbone)

    # ------------------------------------------------------------------------------------------ calibration
    @torch.no_grad()
    def mean_cost_fraction(self, x: torch.Tensor, *, batch_size: int = 500) -> float:
        """Mean cost per sample on ``x`` in execute mode, as a fraction of the full ResNet's FLOPs."""
        was = self.training
        self.eval()
        try:
            total = sum(float(self(x[i:i + batch_size], mode=Mode.EXECUTE).cost.sum())
                        for i in range(0, x.shape[0], batch_size))
        finally:
            self.train(was)
        return total / x.shape[0] / self.costs().static_total

    def calibrate(self, x_val: torch.Tensor, *, budget: float, tol: float = 5e-3, iters: int = 25,
                  batch_size: int = 500) -> KnobCalibration:
        """Fit the gate threshold so that the mean cost on ``x_val`` is ``budget`` × the full ResNet's FLOPs.

        Raising the threshold switches gates off (for BlockDrop, whose decisions are all taken from the input, the
        cost is monotone in it; for the sequential gates of SkipNet and ConvNet-AIG it is monotone in practice:
        bisection returns the closest point it evaluated). Raises ``ValueError`` if the budget is out of reach.
        """
        def set_knob(t: float) -> None:
            self.gate_threshold.fill_(float(t))

        def cost(t: float) -> float:
            before = float(self.gate_threshold)
            set_knob(t)
            try:
                return self.mean_cost_fraction(x_val, batch_size=batch_size)
            finally:
                set_knob(before)

        return calibrate_knob(mean_cost=cost, set_knob=set_knob, budget=budget, lo=0.0, hi=1.0, tol=tol, iters=iters,
                              current=float(self.gate_threshold))


@torch.no_grad()
def module_flops(module: nn.Module, *shape: int) -> float:
    """FLOPs per sample of ``module`` on one zero input of per-sample ``shape``, counted in eval mode (batch norm
    with running statistics) without changing the module's mode."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        p = next(module.parameters())
        return count_flops(module, torch.zeros(1, *shape, dtype=p.dtype, device=p.device)).total
    finally:
        for m, t in modes.items():
            m.training = t


def _merge(samples: list[PolicySample]) -> PolicySample | None:
    """One PolicySample for per-gate samples (actions stacked (B, G), log-probabilities and entropies summed)."""
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    return PolicySample(actions=torch.stack([s.actions for s in samples], 1),
                        log_prob=torch.stack([s.log_prob for s in samples], 1).sum(1),
                        entropy=torch.stack([s.entropy for s in samples], 1).sum(1))


@torch.no_grad()
def block_usage_by_class(model: LayerSkipNetwork, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500
                         ) -> torch.Tensor:
    """(num_classes, L) fraction of the samples of each class that executed each block (execute mode).

    Rows of classes absent from ``y`` are NaN.
    """
    was = model.training
    model.eval()
    try:
        used = torch.cat([model(x[i:i + batch_size], mode=Mode.EXECUTE).blocks.float()
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was)
    c = model.num_classes
    sums = torch.zeros(c, used.shape[1]).index_add_(0, y.long().cpu(), used.cpu())
    counts = torch.bincount(y.long().cpu(), minlength=c).float().unsqueeze(1)
    return sums / counts.where(counts > 0, torch.tensor(float("nan")))


def plot_block_usage(usage: torch.Tensor, path: str, *, class_names: list[str] | None = None,
                     title: str = "blocks executed per class") -> str:
    """Heat map (classes × blocks) of the fraction of samples that ran each block; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, n = usage.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 1.0 + 0.35 * c))
    im = ax.imshow(usage.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(n), [str(i) for i in range(n)])
    ax.set_yticks(range(c), class_names or [str(i) for i in range(c)])
    ax.set_xlabel("residual block")
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=8)
    for i in range(c):
        for j in range(n):
            v = float(usage[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
