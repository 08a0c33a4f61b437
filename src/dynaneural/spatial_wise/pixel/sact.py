"""SACT: spatially adaptive computation time over the residual stages of a ResNet.

Paper: M. Figurnov, M. D. Collins, Y. Zhu, L. Zhang, J. Huang, D. Vetrov, R. Salakhutdinov, "Spatially Adaptive
Computation Time for Residual Networks", CVPR 2017, arXiv:1612.02297.

Adaptive Computation Time (Graves, 2016) applied per spatial position of each stage of L residual units. After
unit l, every still-active position p emits a halting score ``h_l(p) = σ(conv3×3(x_l)(p) + w·avgpool(x_l) + b)``
(h_L = 1). The position halts at the first ``N(p)`` where ``Σ_{l≤N} h_l ≥ 1 − ε``; its remainder is
``R = 1 − Σ_{l<N} h_l``, and the stage output is the halting-weighted mean
``Σ_{l<N} h_l x_l + R·x_N``. Units after a position halted are *not computed there*: their residual runs only
at the still-active positions and halted positions keep their features (which neighbours may still read). The
ponder cost ``ρ = N + R``, averaged over positions and stages and weighted by τ, is the auxiliary loss.

Modes: ``train`` and ``simulate`` compute every unit densely and apply the halting masks (SACT's training
procedure; gradients flow through the halting scores and remainders); ``execute`` runs units 2..L with the
masked residual-block kernel (conv1 at the dilated active set, conv2 and the halting conv at the active set;
gather → one matrix multiply → scatter), so the cost of a position is what it pondered. The first unit of every
stage runs at every position (ACT runs at least one step). ``eps`` is the knob calibration can move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.registry import register_model
from dynaneural.spatial_wise.pixel._resnet import ResNetCifar
from dynaneural.spatial_wise.pixel.sparse_conv import ActivePositions, conv_rows, gather_patches, nhwc, weight_matrix
from dynaneural.validation import check_batch

__all__ = ["HaltingUnit", "SACTConfig", "SACTOutput", "SACTResNet"]


@dataclass
class SACTOutput(DynamicOutput):
    """Output of a SACT network.

    Attributes:
        units_maps: per stage, (B, H, W) int64 number of units N(p) each position ran.
        ponder_maps: per stage, (B, H, W) ponder cost N + R (SACT's "ponder cost maps").
    """

    units_maps: list[torch.Tensor] = field(default_factory=list)
    ponder_maps: list[torch.Tensor] = field(default_factory=list)


class HaltingUnit(nn.Module):
    """SACT's halting score: a 3×3 convolution of the unit's output plus a linear function of its global average
    pool, through a sigmoid. ``bias_init`` < 0 starts with few halts (the paper starts from a pretrained ResNet
    with every unit used)."""

    def __init__(self, chans: int, *, bias_init: float = -3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(chans, 1, 3, padding=1)
        self.pooled = nn.Linear(chans, 1, bias=False)
        nn.init.normal_(self.conv.weight, std=1.0 / (3 * chans ** 0.5))
        nn.init.zeros_(self.pooled.weight)
        nn.init.constant_(self.conv.bias, bias_init)

    def flops(self, active: torch.Tensor, positions: int) -> torch.Tensor:
        """(B,) FLOPs: the 3×3 conv at ``active`` (B,) positions, the pool over all ``positions``, the linear."""
        c = self.conv.in_channels
        return active * (9 * c) + float(c * positions + c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense: (B, C, H, W) → (B, H, W) halting scores."""
        return torch.sigmoid(self.conv(x)[:, 0] + self.pooled(x.mean((2, 3)))[:, :, None])

    def at(self, x: torch.Tensor, pos: ActivePositions) -> torch.Tensor:
        """Sparse: the (N,) halting scores of the active positions only (gather → matrix multiply)."""
        logit = conv_rows(gather_patches(nhwc(x), pos), weight_matrix(self.conv.weight), self.conv.bias)[:, 0]
        return torch.sigmoid(logit + self.pooled(x.mean((2, 3)))[:, 0].index_select(0, pos.batch))


@dataclass(frozen=True)
class SACTConfig:
    """Args:
    in_chans, input_size, num_classes, widths, depths, strides: the ResNet (``_resnet.ResNetCifar``).
    eps: halting threshold 1 − ε. ponder_weight: τ of the ponder cost. halt_bias: initial halting-conv bias.
    """

    in_chans: int = 3
    input_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (3, 3, 3)
    strides: tuple[int, ...] = (1, 2, 2)
    eps: float = 0.01
    ponder_weight: float = 0.01
    halt_bias: float = -3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if min(self.depths) < 2:
            raise ValueError("every stage needs at least 2 units for adaptive computation time")


class SACTResNet(AllOnFlag, DynamicModel):
    """A CIFAR ResNet whose stages stop computing at positions that halted (SACT)."""

    def __init__(self, cfg: SACTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.eps = cfg.eps
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.net = ResNetCifar(in_chans=cfg.in_chans, num_classes=cfg.num_classes, widths=cfg.widths,
                               depths=cfg.depths, strides=cfg.strides)
        # stage s = blocks [starts[s], starts[s] + depths[s]); a halting unit after every unit but the last
        self.starts = [sum(cfg.depths[:s]) for s in range(len(cfg.depths))]
        self.halting = nn.ModuleList(nn.ModuleList(HaltingUnit(w, bias_init=cfg.halt_bias) for _ in range(d - 1))
                                     for w, d in zip(cfg.widths, cfg.depths, strict=True))
        size, w0 = cfg.input_size, cfg.widths[0]
        self.stem_flops = float((cfg.in_chans * 9 * w0 + 2 * w0) * size * size)
        self.sizes: list[int] = []
        for s in cfg.strides:
            size //= s
            self.sizes.append(size)
        self.head_flops = float(cfg.widths[-1] * size * size + cfg.widths[-1] * cfg.num_classes)
        self._all_on = False

    # all_on() comes from AllOnFlag: Every position runs every unit and the stage output is the last unit's (no halting): the static net.

    def to_static(self) -> nn.Module:
        return copy.deepcopy(self.net)

    def load_static(self, static: nn.Module) -> None:
        """Initialise from a trained static twin (SACT fine-tunes a pretrained ResNet)."""
        self.net.load_state_dict(static.state_dict())

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> SACTOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.stem_flops + self.head_flops)
        if mode is Mode.EXECUTE:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.net.stem(x)
        units_maps, ponder_maps, ponders = [], [], []
        computed = torch.zeros(b, dtype=torch.float64, device=x.device)
        possible = 0
        for s, (start, depth, size) in enumerate(zip(self.starts, self.cfg.depths, self.sizes, strict=True)):
            blocks = self.net.blocks[start:start + depth]
            if self._all_on:
                for blk in blocks:
                    h = blk(h)
                    ledger.charge(blk.dense_cost(size, size))
                continue
            run = self._stage_execute if mode is Mode.EXECUTE else self._stage_dense
            h, n_units, ponder = run(s, blocks, h, ledger)
            units_maps.append(n_units)
            ponder_maps.append(ponder)
            ponders.append(ponder.flatten(1).mean(1))
            computed += (n_units - 1).flatten(1).sum(1).double()
            possible += (depth - 1) * size * size
        logits = self.net.head(h)
        aux = {}
        if mode is Mode.TRAIN and ponders:
            aux["ponder"] = self.cfg.ponder_weight * torch.stack(ponders, 1).mean()
        frac = computed / possible if possible else torch.ones(b, dtype=torch.float64, device=x.device)
        return SACTOutput(logits=logits, cost=ledger.flops, decisions={"active_fraction": frac}, mode=mode,
                          aux_losses=aux, units_maps=units_maps, ponder_maps=ponder_maps)

    # ------------------------------------------------------------------------------------ one stage
    def _stage_dense(self, s: int, blocks: nn.ModuleList, h: torch.Tensor, ledger: CostLedger
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train/simulate: every unit at every position, halting applied as masks (differentiable weights)."""
        size = self.sizes[s]
        threshold = 1.0 - self.eps
        h = blocks[0](h)
        ledger.charge(blocks[0].dense_cost(size, size))
        b = h.shape[0]
        active = torch.ones(b, size, size, dtype=torch.bool, device=h.device)
        cum = h.new_zeros(b, size, size)
        remainder = h.new_zeros(b, size, size)
        n_units = torch.ones(b, size, size, dtype=torch.long, device=h.device)
        out = h.new_zeros(h.shape)
        for u in range(len(blocks)):
            if u > 0:
                h = blocks[u].masked_dense(h, active)  # halted positions keep their features
                ledger.charge(blocks[u].position_costs(active))
                n_units = n_units + active.long()
            last = u == len(blocks) - 1
            if last:
                score = torch.ones_like(cum)
            else:
                score = self.halting[s][u](h)
                ledger.charge(self.halting[s][u].flops(active.flatten(1).sum(1, dtype=torch.float64), size * size))
            halt = active & (cum + score >= threshold)
            weight = torch.where(halt, 1.0 - cum, score) * active
            remainder = torch.where(halt, 1.0 - cum, remainder)
            out = out + weight[:, None] * h
            cum = cum + score * active
            active = active & ~halt
        return out, n_units, n_units.to(out.dtype) + remainder

    @torch.no_grad()
    def _stage_execute(self, s: int, blocks: nn.ModuleList, h: torch.Tensor, ledger: CostLedger
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Execute: units 2..L, the halting scores and the output update run on the still-active rows only."""
        size = self.sizes[s]
        threshold = 1.0 - self.eps
        h = blocks[0](h)
        ledger.charge(blocks[0].dense_cost(size, size))
        b, c = h.shape[:2]
        flat_n = b * size * size
        active = torch.ones(b, size, size, dtype=torch.bool, device=h.device)
        cum = h.new_zeros(flat_n)
        remainder = h.new_zeros(flat_n)
        n_units = torch.ones(flat_n, dtype=torch.long, device=h.device)
        out = h.new_zeros(flat_n, c)  # (B·H·W, C) accumulated halting-weighted features
        for u in range(len(blocks)):
            pos = ActivePositions.from_mask(active)
            if pos.count == 0:
                break
            if u > 0:
                h = blocks[u].masked_execute(h, active, inplace=True)
                ledger.charge(blocks[u].position_costs(active))
                n_units.index_add_(0, pos.flat, torch.ones_like(pos.flat))
            idx = pos.flat
            last = u == len(blocks) - 1
            if last:
                score = h.new_ones(pos.count)
            else:
                # every position is active after the first unit: the dense conv is the cheaper way to get them all
                score = self.halting[s][u](h).reshape(-1) if u == 0 else self.halting[s][u].at(h, pos)
                ledger.charge(self.halting[s][u].flops(pos.per_sample().double(), size * size))
            c_act = cum.index_select(0, idx)
            halt = c_act + score >= threshold
            weight = torch.where(halt, 1.0 - c_act, score)
            rows = nhwc(h).view(flat_n, c).index_select(0, idx)
            out.index_add_(0, idx, weight[:, None] * rows)
            remainder.index_copy_(0, idx, torch.where(halt, 1.0 - c_act, remainder.index_select(0, idx)))
            cum.index_copy_(0, idx, c_act + score)
            active.view(-1).index_fill_(0, idx[halt], False)
        out_map = out.view(b, size, size, c).permute(0, 3, 1, 2)
        n_map = n_units.view(b, size, size)
        return out_map, n_map, n_map.to(out.dtype) + remainder.view(b, size, size)


def _make(defaults: dict, overrides: dict) -> SACTResNet:
    return SACTResNet(SACTConfig(**{**defaults, **overrides}))


@register_model
def sact_resnet20_cifar(*, num_classes: int = 10, eps: float = 0.01, ponder_weight: float = 0.01,
                        halt_bias: float = -3.0) -> SACTResNet:
    """ResNet-20 (3 stages of 3 units) on 3×32×32 with spatially adaptive computation time in every stage."""
    return _make({}, dict(num_classes=num_classes, eps=eps, ponder_weight=ponder_weight, halt_bias=halt_bias))


@register_model
def test_sact(*, num_classes: int = 10) -> SACTResNet:
    """Tiny variant for tests: 3×8×8 inputs, 2 stages of 3 units (8, 16 channels); halting bias 0 so positions
    halt after different numbers of units."""
    return _make(dict(in_chans=3, input_size=8, widths=(8, 16), depths=(3, 3), strides=(1, 2)),
                 dict(num_classes=num_classes, halt_bias=0.0))

