"""Cross-layer dynamic connections: a dense block whose connections to earlier layers are gated per sample.

Papers: G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger, "Densely Connected Convolutional Networks",
CVPR 2017, arXiv:1608.06993 (every layer reads the concatenation of all earlier feature maps); the per-sample,
input-dependent gating of those connections follows the dynamic-routing/dynamic-connection line surveyed by
Han et al., "Dynamic Neural Networks: A Survey", TPAMI 2021, arXiv:2102.04906, Sec. 2.3 — e.g. connection
gating as in ConvNet-AIG (Veit & Belongie, ECCV 2018, arXiv:1711.11503), with Gumbel gates and a target-rate loss.

Layer ``l`` of the block reads the features ``f_0`` (the stem) … ``f_l`` (layer ``l-1``'s output). Its gate for
connection ``j`` is attention-guided: a query from the most recent feature and a key from ``f_j``, both from
globally pooled features, ``score_lj = q_l(p_l) · k_lj(p_j) / √d + b_lj``, ``g_lj = [sigmoid(score) ≥ t]``
(Gumbel-sigmoid with straight-through in training). Layer ``l`` computes ``ReLU(BN(Σ_j W_lj * (g_lj f_j)))``
— the convolution of the concatenation split by connection.

Modes:

* ``train`` — relaxed gates multiply the connection slices of the concatenated input;
* ``simulate`` — the reference: hard gates mask the slices, one convolution over the full concatenation;
* ``execute`` — a gated-off slice is never read: samples are grouped by their *connection pattern*
  (``strategy="pattern"``: one convolution per distinct pattern over the concatenation of its open slices,
  with the matching slices of the kernel) or each open connection is convolved on the rows that opened it and
  accumulated (``strategy="connection"``: one convolution per connection on a compact sub-batch). Both are exact.

Cost (analytic, the FLOPs counter's convention; equal in simulate and execute): the stem, every layer's open
connections ``c_j·growth·9·H·W`` plus batch norm, the gates (queries, keys and dot products: the pooling is the
head's, computed once per feature and shared) and the head ``C·H·W + C·classes``. ``all_on`` opens every
connection and skips the gates: exactly the static DenseNet block (``to_static``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.calibration import calibrate_knob
from dynaneural.calibration.thresholds import KnobCalibration
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode, group_rows, rows_where
from dynaneural.layers import ConvBNAct
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import BudgetLoss, TemperatureSchedule, binary_decision
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.functional import FoldedBN, conv_output_size
from dynaneural.validation import check_batch

__all__ = ["GatedDenseConfig", "GatedDenseNet", "calibrate_connections"]


@dataclass(frozen=True)
class GatedDenseConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    stem_chs: channels of the stem conv. stem_stride: its stride. growth: channels each dense layer adds.
    num_layers: dense layers. key_dim: d of the gate attention. threshold: gate threshold at inference.
    budget: target fraction of the block's connection FLOPs (``BudgetLoss``, squared), None = no budget loss.
    budget_weight: its weight. strategy: how execute mode skips (``pattern`` or ``connection``).
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    stem_chs: int = 32
    stem_stride: int = 2
    growth: int = 32
    num_layers: int = 4
    key_dim: int = 16
    threshold: float = 0.5
    budget: float | None = 0.5
    budget_weight: float = 1.0
    strategy: Literal["pattern", "connection"] = "pattern"

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.strategy not in ("pattern", "connection"):
            raise ValueError(f"strategy must be 'pattern' or 'connection', got {self.strategy!r}")


class _DenseLayer(nn.Module):
    def __init__(self, in_splits: list[int], growth: int, key_dim: int) -> None:
        super().__init__()
        self.splits = in_splits
        self.conv = nn.Conv2d(sum(in_splits), growth, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(growth)
        self.folded = FoldedBN()  # conv + BN folded once for execute mode
        self.query = nn.Linear(in_splits[-1], key_dim)
        self.keys = nn.ModuleList(nn.Linear(c, key_dim, bias=False) for c in in_splits)
        self.gate_bias = nn.Parameter(torch.zeros(len(in_splits)))
        self.key_dim = key_dim

    def gate_logits(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(B, J) attention scores of the J connections from the pooled features [(B, c_j)]."""
        q = self.query(pooled[-1])  # (B, d)
        k = torch.stack([key(p) for key, p in zip(self.keys, pooled, strict=True)], 1)  # (B, J, d)
        return torch.einsum("bd,bjd->bj", q, k) / math.sqrt(self.key_dim) + self.gate_bias

    def gate_cost(self) -> float:
        j = len(self.splits)
        return float(self.splits[-1] * self.key_dim + sum(self.splits) * self.key_dim + j * self.key_dim)


class _StaticDense(nn.Module):
    """The static twin: stem, then every layer reads the whole concatenation, pooled linear head."""

    def __init__(self, stem: nn.Module, layers: list[nn.Sequential], head: nn.Linear) -> None:
        super().__init__()
        self.stem, self.layers, self.pool, self.head = stem, nn.ModuleList(layers), nn.AdaptiveAvgPool2d(1), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(self.pool(torch.cat(feats, 1)).flatten(1))


class GatedDenseNet(AllOnFlag, DynamicModel):
    """Stem → a dense block with per-sample gated connections → pooled linear head.

    Decisions: ``connections`` — (B, N) bool, every layer's connection gates in order (layer 0's, then 1's…).
    """

    def __init__(self, cfg: GatedDenseConfig) -> None:
        super().__init__()
        self.config = asdict(cfg)
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.threshold, self.strategy = cfg.threshold, cfg.strategy
        self.stem = ConvBNAct(cfg.in_chans, cfg.stem_chs, stride=cfg.stem_stride)
        self.size = conv_output_size(cfg.input_size, kernel_size=3, stride=cfg.stem_stride, padding=1)
        hw = self.size ** 2
        self.stem_cost = float(cfg.in_chans * cfg.stem_chs * 9 * hw + 2 * cfg.stem_chs * hw)
        splits = [cfg.stem_chs]
        layers = []
        for _ in range(cfg.num_layers):
            layers.append(_DenseLayer(list(splits), cfg.growth, cfg.key_dim))
            splits.append(cfg.growth)
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(sum(splits), cfg.num_classes)
        self.head_cost = float(sum(splits) * (hw + cfg.num_classes))
        self.growth = cfg.growth
        # conv FLOPs of each connection (layer l, input j), and BN per layer
        self.conn_cost = [[float(c * cfg.growth * 9 * hw) for c in m.splits] for m in self.layers]
        self.bn_cost = float(2 * cfg.growth * hw)
        self.full_conn_cost = sum(sum(c) for c in self.conn_cost)
        self.budget_loss = BudgetLoss(target=cfg.budget, weight=cfg.budget_weight) if cfg.budget else None
        self.tau_schedule = TemperatureSchedule(start=1.0, end=0.5, kind="exponential")
        self.tau = self.tau_schedule(0.0)
        self._all_on = False

    # ------------------------------------------------------------------ contract
    def to_static(self) -> nn.Module:
        layers = [nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn), nn.ReLU()) for m in self.layers]
        return _StaticDense(copy.deepcopy(self.stem), layers, copy.deepcopy(self.head))

    def set_train_progress(self, progress: float) -> None:
        self.tau = self.tau_schedule(progress)

    def set_threshold(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        feats = [self.stem(x)]
        ledger.charge(self.stem_cost, part="stem")
        pooled = [feats[0].mean((2, 3))]  # (B, c_j): the head's pooling, computed once per feature
        gates_all, expected = [], x.new_zeros(b)
        for i, layer in enumerate(self.layers):
            if self._all_on:
                y = layer.bn(layer.conv(torch.cat(feats, 1))) if mode is not Mode.EXECUTE else None
                if y is None:
                    w, bias = layer.folded(0, layer.conv.weight, layer.bn)
                    y = F.conv2d(torch.cat(feats, 1), w, bias, padding=1)
                ledger.charge(sum(self.conn_cost[i]) + self.bn_cost, part=f"layer{i}")
            else:
                d = binary_decision(layer.gate_logits(pooled), training=mode is Mode.TRAIN, relaxation="gumbel",
                                    tau=self.tau, threshold=self.threshold)
                ledger.charge(layer.gate_cost(), part=f"gate{i}")
                costs = torch.tensor(self.conn_cost[i], dtype=torch.float64, device=x.device)
                ledger.charge(d.hard.to(torch.float64) @ costs + self.bn_cost, torch.arange(b, device=x.device),
                              part=f"layer{i}")
                expected = expected + d.prob @ costs.to(d.prob.dtype)
                gates_all.append(d.hard)
                if mode is Mode.EXECUTE:
                    y = self._execute_layer(layer, feats, d.hard)
                else:
                    gated = torch.cat([f * v[:, None, None, None] for f, v in zip(feats, d.value.unbind(1),
                                                                                   strict=True)], 1)
                    y = layer.bn(layer.conv(gated))
            feats.append(F.relu(y))
            pooled.append(feats[-1].mean((2, 3)))
        logits = self.head(torch.cat(pooled, 1))
        ledger.charge(self.head_cost, part="head")
        decisions = {} if self._all_on else {"connections": torch.cat(gates_all, 1)}
        aux: dict[str, torch.Tensor] = {}
        if mode is Mode.TRAIN and self.budget_loss is not None and not self._all_on:
            aux["budget"] = self.budget_loss(expected, self.full_conn_cost)
        return DynamicOutput(logits=logits, cost=ledger.flops, decisions=decisions, mode=mode, aux_losses=aux)

    def _execute_layer(self, layer: _DenseLayer, feats: list[torch.Tensor], gates: torch.Tensor) -> torch.Tensor:
        """BN(conv) of the open connections only: gated-off slices are never read."""
        b = gates.shape[0]
        w, bias = layer.folded(0, layer.conv.weight, layer.bn)  # (growth, ΣC, 3, 3)
        w_parts = list(torch.split(w, layer.splits, dim=1))
        out = feats[0].new_empty(b, self.growth, *feats[0].shape[-2:])
        if self.strategy == "connection":
            out.copy_(bias[None, :, None, None].expand_as(out))
            for j, f in enumerate(feats):
                rows = rows_where(gates[:, j])
                if rows.numel():
                    out.index_add_(0, rows, F.conv2d(f.index_select(0, rows), w_parts[j], padding=1))
            return out
        # pattern: one convolution per distinct connection pattern present in the batch
        code = (gates.long() << torch.arange(gates.shape[1], device=gates.device)).sum(1)  # (B,) pattern id
        patterns, inverse = torch.unique(code, return_inverse=True)
        for p, rows in zip(patterns.tolist(), group_rows(inverse, patterns.numel()), strict=True):
            on = [j for j in range(len(feats)) if p >> j & 1]
            if not on:
                out.index_copy_(0, rows, bias[None, :, None, None].expand(rows.numel(), -1, *out.shape[-2:]))
                continue
            whole = rows.numel() == b
            xin = torch.cat([feats[j] if whole else feats[j].index_select(0, rows) for j in on], 1)
            wk = w_parts[on[0]] if len(on) == 1 else torch.cat([w_parts[j] for j in on], 1)
            y = F.conv2d(xin, wk, bias, padding=1)
            if whole:
                return y
            out.index_copy_(0, rows, y)
        return out


@torch.inference_mode()
def calibrate_connections(model: GatedDenseNet, x: torch.Tensor, *, budget: float, batch_size: int = 512
                          ) -> KnobCalibration:
    """Fit the gate threshold so that the mean cost on ``x`` is ``budget`` (a fraction of the static FLOPs)."""
    model.eval()
    with model.all_on():
        full = float(model(x[:1], mode="execute").cost[0])
    prev = model.threshold

    def mean_cost(t: float) -> float:
        model.threshold = t
        c = torch.cat([model(x[i:i + batch_size], mode="execute").cost for i in range(0, x.shape[0], batch_size)])
        model.threshold = prev
        return float(c.mean()) / full

    return calibrate_knob(mean_cost=mean_cost, set_knob=model.set_threshold, budget=budget, lo=0.0, hi=1.0,
                          current=prev, iters=16, tol=5e-3)


def _make(defaults: dict, overrides: dict) -> GatedDenseNet:
    return GatedDenseNet(GatedDenseConfig(**{**defaults, **overrides}))


@register_model
def gated_dense_mnist(*, budget: float | None = 0.5, threshold: float = 0.5,
                      strategy: Literal["pattern", "connection"] = "pattern", num_classes: int = 10) -> GatedDenseNet:
    """28×28 (Fashion-)MNIST: stem 32 (stride 2) → 4 dense layers of growth 32 at 14×14."""
    return _make(dict(in_chans=1, input_size=28), dict(budget=budget, threshold=threshold, strategy=strategy,
                                                       num_classes=num_classes))


@register_model
def gated_dense_cifar10(*, budget: float | None = 0.5, threshold: float = 0.5,
                        strategy: Literal["pattern", "connection"] = "pattern", num_classes: int = 10
                        ) -> GatedDenseNet:
    """32×32 CIFAR-10: stem 32 (stride 2) → 4 dense layers of growth 32 at 16×16."""
    return _make(dict(in_chans=3, input_size=32), dict(budget=budget, threshold=threshold, strategy=strategy,
                                                       num_classes=num_classes))


@register_model
def test_gated_dense(*, budget: float | None = 0.5, threshold: float = 0.5,
                     strategy: Literal["pattern", "connection"] = "pattern", num_classes: int = 10) -> GatedDenseNet:
    """Tiny variant for tests: 1×8×8 inputs, stem 4 → 3 dense layers of growth 4."""
    return _make(dict(in_chans=1, input_size=8, stem_chs=4, stem_stride=1, growth=4, num_layers=3, key_dim=4),
                 dict(budget=budget, threshold=threshold, strategy=strategy, num_classes=num_classes))
