"""MSDNet: a multi-scale dense network whose early-exit classifiers read its coarsest scale.

Paper: G. Huang, D. Chen, T. Li, F. Wu, L. van der Maaten, K. Q. Weinberger, "Multi-Scale Dense Networks for
Resource Efficient Image Classification", ICLR 2018, arXiv:1703.09844.

The paper's two observations shape the design:

1. an early classifier on fine, local features is weak — so the network keeps a *coarse* scale from its very first
   layer, and every classifier reads the coarsest scale;
2. early classifiers bend the features toward their own needs and hurt later ones — so layers are *densely*
   connected: each layer only appends features, and later layers can bypass the ones made for early exits.

Layout (scale 1 is the finest; ``C`` is the channel count in "scale-1 units", ``g_s`` the growth factor of scale s):

    first layer:  x ─ 3×3 conv ─▶ h_1 (C·g_1, H) ─ 3×3/2 ─▶ h_2 (C·g_2, H/2) ─ … ─▶ h_S (C·g_S, H/2^(S-1))
    layer ℓ:      h_s ← concat(h_s, conv3×3(conv1×1(h_s)), conv3×3/2(conv1×1(h_{s-1})))   (half the growth each)
    transition:   h_s ← conv1×1(h_s), compressing C by ``reduction`` where the paper drops the finest scale
    exit k:       two strided 3×3 convs on h_S, global average pool, linear (the paper's CIFAR classifier)

Layers are grouped into blocks (``block_layers``); every block ends at an exit and is one stage of the
:class:`~dynaneural.sample_wise.early_exit.multi_exit.MultiExitNetwork`. The state between stages is the list of
per-scale tensors (finest first), which the network compacts like any tensor in execute mode.

Scale pruning (``prune='max'`` in the authors' code): with ``L`` layers in the design and ``S`` scales,
every ``ceil(L / S)`` layers the finest remaining scale is dropped (and a transition compresses the channels), so the
deep layers — the ones only late exits pay for — run on coarse maps only. In addition the last layers of the built
network compute only the scales that a later layer or the final classifier reads (the last layer only the coarsest,
the one before it the two coarsest, ...): a truncated static baseline (``num_blocks``) never pays for dead features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from dynaneural.layers import ConvBNAct
from dynaneural.registry import register_model
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

__all__ = ["MSDNetConfig", "build_msdnet", "MSDFirstLayer", "MSDLayer", "MSDTransition", "MSDClassifier"]


@dataclass(frozen=True)
class MSDNetConfig:
    """Defaults: the paper's CIFAR widths (16 channels, growth 6, factors 1-2-4, 128-channel classifiers).

    Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    num_scales: S, the number of resolutions (each half the previous one).
    stem_channels: channels of the first layer in scale-1 units (scale s gets ``stem_channels * gr_factor[s]``).
    growth: channels each layer adds, in scale-1 units (scale s gets ``growth * gr_factor[s]``).
    gr_factor: channel multiplier of each scale, finest first (the paper: 1, 2, 4).
    bn_factor: bottleneck width of each scale as a multiple of the conv's output channels (the paper: 1, 2, 4).
    block_layers: layers in each block of the full design (the first block also holds the first layer).
    reduction: channel compression of the transition layers (1.0 = no transitions).
    prune: drop the finest scale every ``ceil(L / S)`` layers, as the paper does.
    head_width: channels of the classifiers' convs. head_convs: strided 3×3 convs before their pooling.
    num_blocks: keep only the first num_blocks blocks (None = all): a prefix of the same design.
    exits: ``"all"`` (an exit after every block) or ``"last"`` (static network).
    exit_policy: build learned exit-policy heads.
    """

    in_chans: int = 3
    input_size: int = 32
    num_classes: int = 10
    num_scales: int = 3
    stem_channels: int = 16
    growth: int = 6
    gr_factor: tuple[int, ...] = (1, 2, 4)
    bn_factor: tuple[int, ...] = (1, 2, 4)
    block_layers: tuple[int, ...] = (4, 2, 2, 2, 2)
    reduction: float = 0.5
    prune: bool = True
    head_width: int = 128
    head_convs: int = 2
    num_blocks: int | None = None
    exits: Literal["all", "last"] = "all"
    exit_policy: bool = False

    def __post_init__(self) -> None:
        if self.num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {self.num_scales}")
        if len(self.gr_factor) != self.num_scales or len(self.bn_factor) != self.num_scales:
            raise ValueError(f"gr_factor {self.gr_factor} and bn_factor {self.bn_factor} need one entry per scale "
                             f"({self.num_scales})")
        if min(self.gr_factor) < 1 or min(self.bn_factor) < 1:
            raise ValueError("gr_factor and bn_factor entries must be >= 1")
        if any(self.growth * g % 2 for g in self.gr_factor[1:]):
            raise ValueError(f"growth * gr_factor must be even at every scale but the finest (it is split between "
                             f"a regular and a strided conv); got growth={self.growth}, gr_factor={self.gr_factor}")
        if self.stem_channels < 1 or self.growth < 1 or self.head_width < 1 or self.head_convs < 0:
            raise ValueError("stem_channels, growth and head_width must be >= 1, head_convs >= 0")
        if not self.block_layers or min(self.block_layers) < 1:
            raise ValueError(f"block_layers must be non-empty with every block >= 1 layer, got {self.block_layers}")
        if not 0.0 < self.reduction <= 1.0:
            raise ValueError(f"reduction must be in (0, 1], got {self.reduction}")
        if self.num_blocks is not None and not 1 <= self.num_blocks <= len(self.block_layers):
            raise ValueError(f"num_blocks must be in [1, {len(self.block_layers)}], got {self.num_blocks}")
        if self.exits not in ("all", "last"):
            raise ValueError(f"exits must be 'all' or 'last', got {self.exits!r}")


class MSDFirstLayer(nn.Module):
    """The first layer: a 3×3 conv at the finest scale, then a strided 3×3 conv down to each coarser scale."""

    def __init__(self, in_chans: int, channels: Sequence[int]) -> None:
        super().__init__()
        convs, prev = [], in_chans
        for s, c in enumerate(channels):
            convs.append(ConvBNAct(prev, c, stride=1 if s == 0 else 2))
            prev = c
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.convs:
            x = conv(x)  # (B, C·g_s, H_s, W_s)
            feats.append(x)
        return feats


class _BottleneckConv(nn.Sequential):
    """The paper's "ConvBN": a 1×1 bottleneck of at most ``bottleneck`` channels, then a 3×3 conv (stride 1 or 2)."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int, bottleneck: int) -> None:
        inner = min(in_chs, bottleneck)
        super().__init__(ConvBNAct(in_chs, inner, kernel_size=1), ConvBNAct(inner, out_chs, stride=stride))


class _ScaleUpdate(nn.Module):
    """One scale of one layer: append new features from this scale (regular conv) and the finer one (strided)."""

    def __init__(self, same_chs: int, finer_chs: int | None, growth: int, bn_same: int, bn_finer: int) -> None:
        super().__init__()
        if finer_chs is None:  # the finest scale present: all new features come from the regular conv
            self.regular = _BottleneckConv(same_chs, growth, stride=1, bottleneck=bn_same * growth)
            self.down = None
        else:
            half = growth // 2
            self.regular = _BottleneckConv(same_chs, half, stride=1, bottleneck=bn_same * half)
            self.down = _BottleneckConv(finer_chs, half, stride=2, bottleneck=bn_finer * half)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        new = [same, self.regular(same)]
        if self.down is not None:
            assert finer is not None
            new.append(self.down(finer))
        return torch.cat(new, 1)  # dense connectivity: (B, C_s + growth_s, H_s, W_s)


class MSDLayer(nn.Module):
    """One MSDNet layer over the ``out_scales`` coarsest of its input scales.

    Args:
        in_chs: channels of the input tensors, finest first.
        growth: channels added at each input scale.
        bn_factor: bottleneck factor of each input scale.
        out_scales: how many of the coarsest scales the layer outputs (fewer than its inputs drops the finest ones;
            the finest dropped input still feeds the strided conv of the first kept scale).
    """

    def __init__(self, in_chs: Sequence[int], growth: Sequence[int], bn_factor: Sequence[int], out_scales: int
                 ) -> None:
        super().__init__()
        if not 1 <= out_scales <= len(in_chs):
            raise ValueError(f"out_scales must be in [1, {len(in_chs)}], got {out_scales}")
        self.offset = len(in_chs) - out_scales
        self.updates = nn.ModuleList(
            _ScaleUpdate(in_chs[j], in_chs[j - 1] if j > 0 else None, growth[j], bn_factor[j],
                         bn_factor[j - 1] if j > 0 else 0)
            for j in range(self.offset, len(in_chs))
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [upd(xs[j], xs[j - 1] if j > 0 else None) for j, upd in enumerate(self.updates, start=self.offset)]


class MSDTransition(nn.Module):
    """1×1 conv-BN-ReLU at each scale, compressing the channels between dense layers."""

    def __init__(self, in_chs: Sequence[int], out_chs: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBNAct(i, o, kernel_size=1) for i, o in zip(in_chs, out_chs, strict=True))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs, strict=True)]


class MSDClassifier(nn.Module):
    """The paper's CIFAR classifier on the coarsest scale: strided 3×3 convs, global average pool, linear."""

    def __init__(self, in_chs: int, num_classes: int, *, width: int = 128, num_convs: int = 2) -> None:
        super().__init__()
        convs, prev = [], in_chs
        for _ in range(num_convs):
            convs.append(ConvBNAct(prev, width, stride=2))
            prev = width
        self.convs = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.pool(self.convs(xs[-1])).flatten(1))  # (B, num_classes)


def build_msdnet(cfg: MSDNetConfig) -> MultiExitNetwork:
    """Build the multi-exit MSDNet described by ``cfg`` (one stage per block, an exit after each kept block)."""
    S, gr = cfg.num_scales, cfg.gr_factor
    interval = math.ceil(sum(cfg.block_layers) / S)  # of the full design, so that num_blocks keeps a prefix of it
    kept = cfg.block_layers[: cfg.num_blocks or len(cfg.block_layers)]
    total = sum(kept)
    n = cfg.stem_channels  # channels in scale-1 units: scale s holds n * gr[s]
    scales = S  # the state holds the `scales` coarsest scales
    layer = 0
    stages: list[nn.Module] = []
    head_chs: list[int] = []
    for b, n_layers in enumerate(kept):
        mods: list[nn.Module] = [MSDFirstLayer(cfg.in_chans, [n * g for g in gr])] if b == 0 else []
        for _ in range(n_layers):
            layer += 1
            drop_here = layer > 1 and (layer - 1) % interval == 0  # where the paper drops a scale
            paper_scales = S - (layer - 1) // interval if cfg.prune else S
            # Keep only the scales something downstream reads: layer `total` feeds the final classifier alone.
            out_scales = min(paper_scales, total - layer + 1, scales)
            present = range(S - scales, S)
            mods.append(MSDLayer([n * gr[s] for s in present], [cfg.growth * gr[s] for s in present],
                                 [cfg.bn_factor[s] for s in present], out_scales))
            scales = out_scales
            n += cfg.growth
            if drop_here and cfg.reduction < 1.0:
                n_new = max(1, math.floor(cfg.reduction * n))
                present = range(S - scales, S)
                mods.append(MSDTransition([n * gr[s] for s in present], [n_new * gr[s] for s in present]))
                n = n_new
        stages.append(nn.Sequential(*mods))
        head_chs.append(n * gr[S - 1])
    exit_at = range(len(kept)) if cfg.exits == "all" else [len(kept) - 1]
    heads = {i: MSDClassifier(head_chs[i], cfg.num_classes, width=cfg.head_width, num_convs=cfg.head_convs)
             for i in exit_at}
    return MultiExitNetwork(stages=stages, heads=heads, num_classes=cfg.num_classes,
                            input_shape=(cfg.in_chans, cfg.input_size, cfg.input_size), exit_policy=cfg.exit_policy,
                            config=asdict(cfg))


def _make(defaults: dict, overrides: dict) -> MultiExitNetwork:
    return build_msdnet(MSDNetConfig(**{**defaults, **overrides}))


@register_model
def msdnet_mnist(*, num_blocks: int | None = None, exits: Literal["all", "last"] = "all", growth: int = 8,
                 exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """28×28 MNIST / Fashion-MNIST: scales 28/14/7, 5 one-layer blocks, an exit after each (~11 MFLOPs static)."""
    return _make(dict(in_chans=1, input_size=28, num_scales=3, stem_channels=8, block_layers=(1, 1, 1, 1, 1),
                      head_width=32, head_convs=2),
                 dict(num_blocks=num_blocks, exits=exits, growth=growth, exit_policy=exit_policy,
                      num_classes=num_classes))


@register_model
def msdnet_cifar(*, num_blocks: int | None = None, exits: Literal["all", "last"] = "all", growth: int = 8,
                 exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """32×32 CIFAR: scales 32/16/8, 6 one-layer blocks, an exit after each (~16 MFLOPs static).

    Sized for CPU training (~0.21 s per training step at batch 128 on 2 cores, channels_last): narrow convolutions
    and batch norms at full resolution run far below peak there, and deeper blocks (4 layers before the first exit,
    then 2 per exit, growth 6: 35 MFLOPs) were over twice as slow per step.
    """
    return _make(dict(in_chans=3, input_size=32, num_scales=3, stem_channels=8, block_layers=(1, 1, 1, 1, 1, 1),
                      head_width=32, head_convs=2),
                 dict(num_blocks=num_blocks, exits=exits, growth=growth, exit_policy=exit_policy,
                      num_classes=num_classes))


@register_model
def msdnet_digits(*, num_blocks: int | None = None, exits: Literal["all", "last"] = "all", growth: int = 8,
                  exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """8×8 scikit-learn digits: scales 8/4/2, 4 one-layer blocks, an exit after each (~0.7 MFLOPs static)."""
    return _make(dict(in_chans=1, input_size=8, num_scales=3, stem_channels=8, block_layers=(1, 1, 1, 1),
                      head_width=32, head_convs=1),
                 dict(num_blocks=num_blocks, exits=exits, growth=growth, exit_policy=exit_policy,
                      num_classes=num_classes))


@register_model
def test_msdnet(*, num_blocks: int | None = None, exits: Literal["all", "last"] = "all", growth: int = 2,
                exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """Tiny variant for tests: 2 scales (8/4) on 1×8×8 inputs, 3 blocks of 1 layer; the last one drops scale 1."""
    return _make(dict(in_chans=1, input_size=8, num_scales=2, stem_channels=4, gr_factor=(1, 2), bn_factor=(1, 2),
                      block_layers=(1, 1, 1), head_width=8, head_convs=1),
                 dict(num_blocks=num_blocks, exits=exits, growth=growth, exit_policy=exit_policy,
                      num_classes=num_classes))
