"""Per-sample width levels: a slimmable CNN whose width (25/50/75/100 % of the channels) is chosen per sample.

Papers: J. Yu, L. Yang, N. Xu, J. Yang, T. Huang, "Slimmable Neural Networks", ICLR 2019, arXiv:1812.08928
(shared weights sliced to the first ``c·w`` channels, switchable batch norm — one BN per width — and training
every width on every batch); J. Yu, T. Huang, "Universally Slimmable Networks and Improved Training
Techniques", ICCV 2019, arXiv:1903.05134 (in-place distillation: the widest net teaches the narrow ones). The
per-sample width chooser follows dynamic-slimmable practice (e.g. Li et al., "Dynamic Slimmable Network",
CVPR 2021, arXiv:2103.13258, which gates the width per input with a small head).

The chooser here is a tiny policy on a pooled copy of the input (``pool × pool`` average pooling, an MLP) that
predicts, for each width level, the probability that the level's prediction agrees with the full-width
prediction; it is trained with a binary cross-entropy on that agreement (label-free, so it can be trained in the
same run, returned as ``aux_losses["width_policy"]``). At inference a sample takes the *smallest* level whose
probability reaches ``threshold`` (the full width otherwise); ``threshold`` is the knob
:func:`~dynaneural.calibration.calibrate_knob` fits to a FLOPs budget (``calibrate_width``).

The second chooser (``chooser="cascade"``) needs no policy: a sample runs the first level of a ladder (e.g. 50 %
→ 100 %), stops if that level's max-softmax confidence (the early-exit library's ``confidence`` rule) reaches
``threshold``, and otherwise runs the next level from the input again — slimmable widths do not share activations,
so a sample that climbs pays every level it ran, and the ledger charges exactly that. It is the width analogue of
a cascade of networks (Wang et al., "IDK Cascades", UAI 2018; the survey's Sec. 3.1 cascades), on one set of
shared weights. The policy decides before seeing any feature; the cascade decides from the network's own output
(BENCHMARKS.md compares the two on CIFAR-10).

Modes:

* ``train`` — every width runs on the whole batch (the sandwich rule with all widths); ``exit_logits`` holds
  the logits of each width so that the library's ``MultiExitLoss`` trains all of them (its ``distill_alpha``
  is the in-place distillation from the widest);
* ``simulate`` — the reference: every width runs on every sample, each sample's logits are picked from its level;
* ``execute`` — the samples are grouped by the level they chose (``execution.group_rows``: one sort) and every
  group runs the sliced weights (BN folded) of its width as one dense sub-batch: a sample at 50 % width costs
  about a quarter of the full network, and that is what runs. The cascade runs its first level on the batch and
  each later level on the gathered rows still undecided, scattering answers back in the original order.

Cost (analytic, the FLOPs counter's convention): the policy (pooling ``C·H·W`` + its two linear maps) plus the
chosen width's convolutions (``c_in·c_out·9·H'·W'``), batch norms (``2·c_out·H'·W'``) and head.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.calibration import calibrate_knob
from dynaneural.calibration.thresholds import KnobCalibration
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode, group_rows, select_rows
from dynaneural.outputs import DynamicOutput
from dynaneural.policies.exit_rules import ConfidenceRule
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.functional import FoldedBN, conv_output_size
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork
from dynaneural.validation import check_batch

__all__ = ["SlimConv", "SlimmableCNN", "SlimmableConfig", "SlimmableOutput", "calibrate_width"]


@dataclass(frozen=True)
class SlimmableConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths: full-width output channels of each 3×3 conv layer. strides: stride of each layer.
    width_mults: the width levels, ascending, the last 1.0.
    policy_pool: the policy reads the input average-pooled to ``policy_pool × policy_pool``.
    policy_hidden: hidden units of the policy MLP.
    threshold: with ``chooser="policy"``, a sample takes the smallest level whose agreement probability reaches
        this; with ``chooser="cascade"``, a sample stops at the first level of the ladder whose max-softmax
        confidence reaches it.
    policy_weight: weight of the policy's BCE in ``aux_losses``.
    chooser: ``"policy"`` (the input policy picks one level before anything runs) or ``"cascade"`` (run the
        ladder's levels in order and stop when confident; a sample pays every level it ran).
    cascade_levels: the cascade's ladder (ascending level indices ending at the full width); ``None``: all levels.
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2)
    width_mults: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    policy_pool: int = 7
    policy_hidden: int = 32
    threshold: float = 0.5
    policy_weight: float = 1.0
    chooser: str = "policy"
    cascade_levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.strides):
            raise ValueError(f"widths {self.widths} and strides {self.strides} must have the same length")
        m = list(self.width_mults)
        if not m or m != sorted(m) or m[-1] != 1.0 or m[0] <= 0:
            raise ValueError(f"width_mults must be ascending in (0, 1] and end at 1.0, got {self.width_mults}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        check_chooser(self.chooser, self.cascade_levels, num_levels=len(m))


CHOOSERS = ("policy", "cascade")


def check_chooser(chooser: str, cascade_levels: tuple[int, ...] | None, *, num_levels: int) -> tuple[int, ...]:
    """Validate a width chooser and return the cascade's ladder (all levels when ``cascade_levels`` is None)."""
    if chooser not in CHOOSERS:
        raise ValueError(f"chooser must be one of {CHOOSERS}, got {chooser!r}")
    ladder = tuple(range(num_levels)) if cascade_levels is None else tuple(int(v) for v in cascade_levels)
    if (not ladder or list(ladder) != sorted(set(ladder)) or ladder[0] < 0 or ladder[-1] != num_levels - 1):
        raise ValueError(f"cascade_levels must be strictly ascending level indices in [0, {num_levels - 1}] "
                         f"ending at the full width {num_levels - 1}, got {cascade_levels!r}")
    return ladder


@dataclass
class SlimmableOutput(DynamicOutput):
    """Output of :class:`SlimmableCNN`.

    Attributes:
        exit_logits: logits of every width level (train and simulate mode; ``None`` in execute mode).
        width_logits: (B, L) the policy's agreement logits per level (``None`` when the policy did not run).
    """

    exit_logits: list[torch.Tensor] | None = None
    width_logits: torch.Tensor | None = field(default=None)

    @property
    def width(self) -> torch.Tensor:
        """(B,) width level each sample ran at."""
        return self.decisions["width"]


class SlimConv(nn.Module):
    """A 3×3 conv → switchable BN → ReLU that runs at any of the width levels (sliced weights)."""

    def __init__(self, in_chs: tuple[int, ...], out_chs: tuple[int, ...], *, stride: int, in_size: int) -> None:
        super().__init__()
        self.in_chs, self.out_chs = in_chs, out_chs
        self.conv = nn.Conv2d(max(in_chs), max(out_chs), 3, stride=stride, padding=1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in out_chs)  # switchable BN: statistics differ per width
        self.out_size = conv_output_size(in_size, kernel_size=3, stride=stride, padding=1)
        self._folded = FoldedBN()  # per level, for execute mode

    def forward(self, x: torch.Tensor, level: int, *, folded: bool = False) -> torch.Tensor:
        c_in, c_out = self.in_chs[level], self.out_chs[level]
        w = self.conv.weight[:c_out, :c_in]  # the first channels: slimmable weight sharing
        if folded:
            wf, bf = self._folded(level, w, self.bns[level])  # type: ignore[arg-type]
            return F.conv2d(x, wf, bf, stride=self.conv.stride, padding=1).relu_()  # in place: one pass fewer
        return F.relu(self.bns[level](F.conv2d(x, w, stride=self.conv.stride, padding=1)))

    def cost(self, level: int) -> float:
        hw = self.out_size * self.out_size
        c_in, c_out = self.in_chs[level], self.out_chs[level]
        return float(c_in * c_out * 9 * hw + 2 * c_out * hw)


class SlimmableCNN(AllOnFlag, DynamicModel):
    """A slimmable CNN with a per-sample width policy (see the module docstring).

    Decisions: ``width`` — (B,) int64 level index into ``width_mults``.
    """

    def __init__(self, cfg: SlimmableConfig) -> None:
        super().__init__()
        self.config = asdict(cfg)
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.width_mults = tuple(cfg.width_mults)
        self.threshold = cfg.threshold
        self.policy_weight = cfg.policy_weight
        levels = len(cfg.width_mults)
        self.chooser = cfg.chooser
        self.ladder = check_chooser(cfg.chooser, cfg.cascade_levels, num_levels=levels)
        prev: tuple[int, ...] = (cfg.in_chans,) * levels
        size, layers = cfg.input_size, []
        for w, s in zip(cfg.widths, cfg.strides, strict=True):
            outs = tuple(max(1, round(w * m)) for m in cfg.width_mults)
            layers.append(SlimConv(prev, outs, stride=s, in_size=size))
            prev, size = outs, layers[-1].out_size
        self.layers = nn.ModuleList(layers)
        self.final_chs, self.final_size = prev, size
        self.head = nn.Linear(prev[-1], cfg.num_classes)
        p = min(cfg.policy_pool, cfg.input_size)
        self.policy = nn.Sequential(nn.AdaptiveAvgPool2d(p), nn.Flatten(),
                                    nn.Linear(cfg.in_chans * p * p, cfg.policy_hidden), nn.ReLU(),
                                    nn.Linear(cfg.policy_hidden, levels))
        self.policy_cost = float(cfg.in_chans * cfg.input_size ** 2 + cfg.in_chans * p * p * cfg.policy_hidden
                                 + cfg.policy_hidden * levels)
        self.level_cost = [sum(m.cost(lv) for m in self.layers)
                           + self.final_chs[lv] * (size * size + cfg.num_classes) for lv in range(levels)]
        self._all_on = False

    @property
    def num_levels(self) -> int:
        return len(self.width_mults)

    # ------------------------------------------------------------------ contract
    def to_static(self, level: int = -1) -> nn.Module:
        """The plain CNN at one width level (default: full width) with that level's weights and BN."""
        level = level % self.num_levels
        body: list[nn.Module] = []
        for m in self.layers:
            c_in, c_out = m.in_chs[level], m.out_chs[level]
            conv = nn.Conv2d(c_in, c_out, 3, stride=m.conv.stride, padding=1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(m.conv.weight[:c_out, :c_in])
            body.append(nn.Sequential(conv, copy.deepcopy(m.bns[level]), nn.ReLU()))
        c = self.final_chs[level]
        head = nn.Linear(c, self.num_classes)
        with torch.no_grad():
            head.weight.copy_(self.head.weight[:, :c])
            head.bias.copy_(self.head.bias)
        return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).to(self.head.weight.device)

    def to_cascade(self) -> MultiExitNetwork:
        """The cascade chooser as a plain model cascade, for deployment: the ladder's widths as static CNNs
        (:meth:`to_static`, copies of the shared weights and of each width's BN) chained by
        :func:`~dynaneural.sample_wise.early_exit.cascade.build_cascade`, with this model's threshold on the
        ``confidence`` rule at every rung but the last.

        It takes the same decisions (exit ``k`` = the ladder's ``k``-th width), gives the same logits and charges
        the same per-sample cost as this model in execute mode, and it adds what the multi-exit machinery has:
        streamed execution (``slots=``: every width runs on full batches over a stream of inputs), per-exit
        thresholds and the other exit rules. Fold its batch norms for speed with
        :func:`dynaneural.layers.fold_batch_norms` (the ledger then counts no BN, as the folded network runs none).
        """
        from dynaneural.sample_wise.early_exit.cascade import build_cascade

        members = [self.to_static(lv) for lv in self.ladder]
        cascade = build_cascade(members, num_classes=self.num_classes, input_shape=self.input_shape)
        cascade.configure_exits(rule="confidence",
                                thresholds=[self.threshold] * (len(self.ladder) - 1) + [float("-inf")])
        return cascade.train(self.training)

    def set_threshold(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def set_chooser(self, chooser: str, *, cascade_levels: tuple[int, ...] | list[int] | None = None) -> None:
        """Switch the width chooser of a trained model (the weights serve both); see :class:`SlimmableConfig`."""
        self.ladder = check_chooser(chooser, None if cascade_levels is None else tuple(cascade_levels),
                                    num_levels=self.num_levels)
        self.chooser = chooser

    @property
    def ladder_cost(self) -> list[float]:
        """Cumulative cost of the cascade's ladder: what a sample that stops at its i-th rung has paid."""
        out, total = [], 0.0
        for lv in self.ladder:
            total += self.level_cost[lv]
            out.append(total)
        return out

    # ------------------------------------------------------------------ pieces
    def run_level(self, x: torch.Tensor, level: int, *, folded: bool = False) -> torch.Tensor:
        """Logits of the network sliced to width level ``level`` (B, classes)."""
        h = x
        for m in self.layers:
            h = m(h, level, folded=folded)
        c = self.final_chs[level]
        return F.linear(h.mean((2, 3)), self.head.weight[:, :c], self.head.bias)

    def choose(self, width_logits: torch.Tensor) -> torch.Tensor:
        """(B,) the smallest level whose agreement probability reaches the threshold (the widest otherwise)."""
        ok = torch.sigmoid(width_logits) >= self.threshold  # (B, L)
        ok[:, -1] = True
        return ok.to(torch.int8).argmax(1)  # first True

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> SlimmableOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        if self.chooser == "cascade" and not self._all_on and mode is not Mode.TRAIN:
            return self._forward_cascade(x, mode)
        ledger = CostLedger.zeros(b, device=x.device)
        if self._all_on:
            level = torch.full((b,), self.num_levels - 1, dtype=torch.long, device=x.device)
            width_logits = None
        else:
            width_logits = self.policy(x)  # (B, L)
            ledger.charge(self.policy_cost, part="policy")
            level = self.choose(width_logits)
        if mode is Mode.EXECUTE:
            if b == 1:  # one sample, one width: no grouping, no scatter
                lv = int(level)
                ledger.charge(self.level_cost[lv], part="backbone")
                return SlimmableOutput(logits=self.run_level(x, lv, folded=True), cost=ledger.flops,
                                       decisions={"width": level}, mode=mode, width_logits=width_logits)
            logits = x.new_empty(b, self.num_classes)
            for lv, rows in enumerate(group_rows(level, self.num_levels)):
                if rows.numel() == 0:
                    continue
                sub = x if rows.numel() == b else select_rows(x, rows)  # the rows that chose this width
                logits.index_copy_(0, rows, self.run_level(sub, lv, folded=True))
                ledger.charge(self.level_cost[lv], rows, part="backbone")
            return SlimmableOutput(logits=logits, cost=ledger.flops, decisions={"width": level}, mode=mode,
                                   width_logits=width_logits)
        # train / simulate: every width on every sample
        costs = torch.tensor(self.level_cost, dtype=torch.float64, device=x.device)
        exit_logits = [self.run_level(x, lv) for lv in range(self.num_levels)]
        stacked = torch.stack(exit_logits, 1)  # (B, L, classes)
        logits = stacked.gather(1, level[:, None, None].expand(b, 1, self.num_classes)).squeeze(1)
        ledger.charge(costs[level], torch.arange(b, device=x.device), part="backbone")
        aux: dict[str, torch.Tensor] = {}
        if mode is Mode.TRAIN:
            logits = exit_logits[-1]  # the trainer's accuracy is the full width's; every width is in exit_logits
            if width_logits is not None and self.policy_weight > 0:
                # Label-free target: does this width agree with the full width's prediction?
                full = exit_logits[-1].detach().argmax(-1)
                agree = torch.stack([z.detach().argmax(-1) == full for z in exit_logits], 1).to(width_logits.dtype)
                aux["width_policy"] = self.policy_weight * F.binary_cross_entropy_with_logits(width_logits, agree)
        return SlimmableOutput(logits=logits, cost=ledger.flops, decisions={"width": level}, mode=mode,
                               aux_losses=aux, exit_logits=exit_logits, width_logits=width_logits)

    def _forward_cascade(self, x: torch.Tensor, mode: Mode) -> SlimmableOutput:
        """Confidence cascade over the ladder: a sample stops at the first rung whose max-softmax reaches the
        threshold (the last rung always accepts) and pays every rung it ran.

        Execute runs each rung on the samples still undecided only (gathered, run, scattered back); simulate runs
        every width on every sample and charges each sample the ladder's cumulative cost up to its stop."""
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        if mode is Mode.EXECUTE:
            level = torch.empty(b, dtype=torch.long, device=x.device)  # every row is filled at its stop
            logits = x.new_empty(b, self.num_classes)
            active = torch.arange(b, device=x.device)
            for i, lv in enumerate(self.ladder):
                sub = x if active.numel() == b else select_rows(x, active)
                z = self.run_level(sub, lv, folded=True)
                ledger.charge(self.level_cost[lv], active, part="backbone")
                if i == len(self.ladder) - 1:
                    done = torch.ones(active.numel(), dtype=torch.bool, device=x.device)
                else:
                    done = self.confident(z)
                rows = active[done]
                logits.index_copy_(0, rows, z[done])
                level.index_fill_(0, rows, lv)
                active = active[~done]
                if active.numel() == 0:
                    break
            return SlimmableOutput(logits=logits, cost=ledger.flops, decisions={"width": level}, mode=mode)
        exit_logits = [self.run_level(x, lv) for lv in range(self.num_levels)]
        stop = self.cascade_stops(torch.stack([exit_logits[lv] for lv in self.ladder], 1))
        ladder = torch.tensor(self.ladder, device=x.device)
        level = ladder[stop]
        logits = torch.stack(exit_logits, 1)[torch.arange(b, device=x.device), level]
        paid = torch.tensor(self.ladder_cost, dtype=torch.float64, device=x.device)[stop]
        ledger.charge(paid, torch.arange(b, device=x.device), part="backbone")
        return SlimmableOutput(logits=logits, cost=ledger.flops, decisions={"width": level}, mode=mode,
                               exit_logits=exit_logits)

    def confident(self, logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Whether the confidence rule's score (max-softmax) of ``logits`` (..., classes) reaches the threshold."""
        t = self.threshold if threshold is None else threshold
        return ConfidenceRule().score(logits, {})[0] >= t

    def cascade_stops(self, rung_logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """(B,) index of the rung where each sample stops, from the (B, R, classes) logits of the ladder's rungs."""
        ok = self.confident(rung_logits, threshold)  # (B, R)
        ok[:, -1] = True
        return ok.to(torch.int8).argmax(1)


@torch.inference_mode()
def calibrate_width(model: SlimmableCNN, x: torch.Tensor, *, budget: float, batch_size: int = 512
                    ) -> KnobCalibration:
    """Fit the chooser's threshold so that the mean cost on ``x`` is ``budget`` (a fraction of the full width's).

    The policy (or, for the cascade, every rung of the ladder) runs once; each threshold is then evaluated from
    those logits, since the cost only depends on the level (or the rung where a sample stops).
    """
    model.eval()
    chunks = [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]
    prev = model.threshold
    if model.chooser == "cascade":
        rungs = torch.cat([torch.stack([model.run_level(c, lv) for lv in model.ladder], 1) for c in chunks])
        paid = torch.tensor(model.ladder_cost, dtype=torch.float64)
        full = model.level_cost[-1]

        def mean_cost(t: float) -> float:
            return float(paid[model.cascade_stops(rungs, t)].mean() / full)
    else:
        logits = torch.cat([model.policy(c) for c in chunks])
        full = model.level_cost[-1] + model.policy_cost
        costs = torch.tensor(model.level_cost, dtype=torch.float64)

        def mean_cost(t: float) -> float:
            model.threshold = t
            level = model.choose(logits)
            model.threshold = prev
            return float((costs[level].mean() + model.policy_cost) / full)

    return calibrate_knob(mean_cost=mean_cost, set_knob=model.set_threshold, budget=budget, lo=0.0, hi=1.0,
                          current=prev)


def _make(defaults: dict, overrides: dict) -> SlimmableCNN:
    return SlimmableCNN(SlimmableConfig(**{**defaults, **overrides}))


_Ladder = tuple[int, ...] | None


@register_model
def slimmable_mnist(*, threshold: float = 0.5, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                    chooser: str = "policy", cascade_levels: _Ladder = None) -> SlimmableCNN:
    """28×28 MNIST: 3 conv layers (32, 64, 128 channels at full width; strides 1, 2, 2), widths 25–100 %.
    ``widths`` sets the full-width channels of the three layers; ``chooser`` / ``cascade_levels`` as in
    :class:`SlimmableConfig`."""
    if len(widths) != 3:
        raise ValueError(f"slimmable_mnist has 3 conv layers: widths needs 3 entries, got {widths!r}")
    return _make(dict(in_chans=1, input_size=28, widths=tuple(int(w) for w in widths)),
                 dict(threshold=threshold, num_classes=num_classes, chooser=chooser, cascade_levels=cascade_levels))


@register_model
def slimmable_cifar10(*, threshold: float = 0.5, num_classes: int = 10, chooser: str = "policy",
                      cascade_levels: _Ladder = None) -> SlimmableCNN:
    """32×32 CIFAR-10: 4 conv layers (32, 64, 128, 128; strides 1, 2, 2, 1), widths 25–100 %."""
    return _make(dict(in_chans=3, input_size=32, widths=(32, 64, 128, 128), strides=(1, 2, 2, 1), policy_pool=8),
                 dict(threshold=threshold, num_classes=num_classes, chooser=chooser, cascade_levels=cascade_levels))


@register_model
def test_slimmable(*, threshold: float = 0.5, num_classes: int = 10) -> SlimmableCNN:
    """Tiny variant for tests: 1×8×8 inputs, 2 conv layers of 8 channels, 4 width levels."""
    return _make(dict(in_chans=1, input_size=8, widths=(8, 8), strides=(1, 2), policy_pool=4, policy_hidden=8),
                 dict(threshold=threshold, num_classes=num_classes))


@register_model
def test_slimmable_cascade(*, threshold: float = 0.15, num_classes: int = 10,
                           cascade_levels: _Ladder = (0, 1, 3)) -> SlimmableCNN:
    """Tiny variant for tests with the confidence cascade over levels 25 → 50 → 100 %. Its head starts 30× the
    default scale so that an untrained network's confidences spread around the threshold and samples stop at
    different rungs (with the default init every max-softmax lies within 0.001 of the others)."""
    m = _make(dict(in_chans=1, input_size=8, widths=(8, 8), strides=(1, 2), policy_pool=4, policy_hidden=8),
              dict(threshold=threshold, num_classes=num_classes, chooser="cascade", cascade_levels=cascade_levels))
    with torch.no_grad():
        m.head.weight.mul_(30.0)
    return m
