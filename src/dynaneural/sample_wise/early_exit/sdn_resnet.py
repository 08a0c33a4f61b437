"""SDN ResNet: a CIFAR ResNet turned into a Shallow-Deep Network by internal classifiers after chosen blocks.

Paper: Y. Kaya, S. Hong, T. Dumitras, "Shallow-Deep Networks: Understanding and Mitigating Network Overthinking",
ICML 2019, arXiv:1810.07052.

SDN's point: many samples are classified correctly by a *shallow* part of an off-the-shelf network, and
some are even misclassified later ("overthinking"); internal classifiers (ICs) attached to the backbone let such
samples leave early. An IC is deliberately cheap — the *feature reduction* pools the block's output to
a small map with a learned mix of max and average pooling, ``α·maxpool(h) + (1 − α)·avgpool(h)``, then one linear
layer — and the ICs sit where the network has spent about 15 %, 30 %, 45 %, 60 %, 75 % and 90 % of its cost.

Layout (the CIFAR ResNet of He et al., 6n+2 layers; SDN uses ResNet-56, n = 9):

    stem: 3×3 conv-BN-ReLU to 16 channels
    3 groups of n basic blocks, 16 / 32 / 64 channels, the first block of groups 2 and 3 strided (resolution halves)
    basic block: relu(BN(conv3×3(relu(BN(conv3×3(h))))) + shortcut(h)), shortcut = 1×1 conv-BN where shapes change
    IC after block b: mixed max/avg pool to ``ic_pool``×``ic_pool``, flatten, linear
    final classifier: global average pool, linear

Each :class:`~dynaneural.sample_wise.early_exit.multi_exit.MultiExitNetwork` stage is the run of blocks that ends at
an exit (the stem belongs to the first stage).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from dynaneural.layers import ConvBNAct, PooledLinearHead
from dynaneural.registry import register_model
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

__all__ = ["SDNResNetConfig", "build_sdn_resnet", "sdn_exit_blocks", "BasicBlock", "MixedPool",
           "InternalClassifier"]

#: SDN places its internal classifiers where the network has spent these fractions of its cost.
SDN_EXIT_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


@dataclass(frozen=True)
class SDNResNetConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths: channels of each group (the first block of every group after the first halves the resolution).
    blocks_per_group: n, basic blocks per group (ResNet-(6n+2): 3 → ResNet-20, 5 → ResNet-32, 9 → ResNet-56).
    exit_blocks: indices of the blocks followed by an internal classifier (None = SDN's placement, see
        :func:`sdn_exit_blocks`); the last block always has the final classifier.
    ic_pool: the ICs' feature reduction pools to ic_pool × ic_pool (smaller maps are not pooled further).
    exits: ``"all"`` (the internal classifiers and the final one) or ``"last"`` (the static ResNet).
    exit_policy: build learned exit-policy heads.
    """

    in_chans: int = 3
    input_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_group: int = 3
    exit_blocks: tuple[int, ...] | None = None
    ic_pool: int = 4
    exits: Literal["all", "last"] = "all"
    exit_policy: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.widths) * self.blocks_per_group

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be non-empty and positive, got {self.widths}")
        if self.blocks_per_group < 1:
            raise ValueError(f"blocks_per_group must be >= 1, got {self.blocks_per_group}")
        if self.ic_pool < 1:
            raise ValueError(f"ic_pool must be >= 1, got {self.ic_pool}")
        if self.exit_blocks is not None:
            eb = tuple(self.exit_blocks)
            if list(eb) != sorted(set(eb)) or (eb and not 0 <= eb[0] <= eb[-1] < self.num_blocks - 1):
                raise ValueError(f"exit_blocks must be increasing block indices in [0, {self.num_blocks - 2}] (the "
                                 f"last block always has the final classifier), got {self.exit_blocks}")
        if self.exits not in ("all", "last"):
            raise ValueError(f"exits must be 'all' or 'last', got {self.exits!r}")


def sdn_exit_blocks(num_blocks: int, fractions: tuple[float, ...] = SDN_EXIT_FRACTIONS) -> tuple[int, ...]:
    """Blocks after which SDN puts its ICs: where ≈ each fraction of the network's cost has been spent.

    The blocks of a CIFAR ResNet cost about the same (channels double where the resolution halves), so the cost
    fraction is read as a fraction of the blocks. Duplicates merge; the last block is left to the final classifier.
    """
    if num_blocks < 2:
        return ()
    return tuple(sorted({min(max(round(f * num_blocks) - 1, 0), num_blocks - 2) for f in fractions}))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3×3 conv-BN, a 1×1 conv-BN shortcut where the shape changes, ReLU after the sum."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_chs, out_chs, stride=stride)
        self.conv2 = ConvBNAct(out_chs, out_chs, act_layer=nn.Identity)
        self.shortcut = (nn.Identity() if stride == 1 and in_chs == out_chs
                         else ConvBNAct(in_chs, out_chs, kernel_size=1, stride=stride, act_layer=nn.Identity))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class _Mix(nn.Module):
    """``α·a + (1 − α)·b`` with a learned scalar α (the SDN code draws it at random in [0, 1); we start at 0.5).

    Its own module so that the FLOPs counter sees a leaf that says what it costs: element-wise work, 0 FLOPs by the
    library's convention (as for activations and residual sums).
    """

    def __init__(self, init: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.alpha * a + (1 - self.alpha) * b

    def flops(self, inputs: tuple[Any, ...], output: Any) -> float:
        return 0.0


class MixedPool(nn.Module):
    """SDN's feature reduction: a learned mix of adaptive max and average pooling to ``size × size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.max_pool = nn.AdaptiveMaxPool2d(size)  # no parameters, 0 FLOPs (comparisons)
        self.avg_pool = nn.AdaptiveAvgPool2d(size)  # counted: 1 FLOP per input element
        self.mix = _Mix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.max_pool(x), self.avg_pool(x))  # (B, C, size, size)


class InternalClassifier(nn.Module):
    """An SDN internal classifier: feature reduction, flatten, linear."""

    def __init__(self, in_chs: int, num_classes: int, *, pool: int) -> None:
        super().__init__()
        self.reduce = MixedPool(pool)
        self.fc = nn.Linear(in_chs * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.reduce(x).flatten(1))  # (B, C·pool²) -> (B, num_classes)


def build_sdn_resnet(cfg: SDNResNetConfig) -> MultiExitNetwork:
    """Build the SDN ResNet described by ``cfg``: stages end at the ICs, the final classifier ends the last one."""
    blocks: list[nn.Module] = []
    chs: list[int] = []
    sizes: list[int] = []
    prev, size = cfg.widths[0], cfg.input_size
    for g, w in enumerate(cfg.widths):
        for i in range(cfg.blocks_per_group):
            stride = 2 if g > 0 and i == 0 else 1
            blocks.append(BasicBlock(prev, w, stride=stride))
            size = math.ceil(size / stride)  # 3×3 conv, padding 1
            prev = w
            chs.append(w)
            sizes.append(size)
    n = len(blocks)
    ic_blocks = (cfg.exit_blocks if cfg.exit_blocks is not None else sdn_exit_blocks(n)) if cfg.exits == "all" else ()
    ends = [*ic_blocks, n - 1]
    stages: list[nn.Module] = []
    start = 0
    for end in ends:
        stem = [ConvBNAct(cfg.in_chans, cfg.widths[0])] if start == 0 else []
        stages.append(nn.Sequential(*stem, *blocks[start: end + 1]))
        start = end + 1
    heads: dict[int, nn.Module] = {
        k: InternalClassifier(chs[b], cfg.num_classes, pool=min(cfg.ic_pool, sizes[b])) for k, b in enumerate(ic_blocks)
    }
    heads[len(ends) - 1] = PooledLinearHead(chs[-1], cfg.num_classes, pool=1)
    return MultiExitNetwork(stages=stages, heads=heads, num_classes=cfg.num_classes,
                            input_shape=(cfg.in_chans, cfg.input_size, cfg.input_size), exit_policy=cfg.exit_policy,
                            config=asdict(cfg))


def _make(defaults: dict, overrides: dict) -> MultiExitNetwork:
    return build_sdn_resnet(SDNResNetConfig(**{**defaults, **overrides}))


@register_model
def sdn_resnet_cifar(*, blocks_per_group: int = 3, exit_blocks: tuple[int, ...] | None = None,
                     exits: Literal["all", "last"] = "all", exit_policy: bool = False, num_classes: int = 10
                     ) -> MultiExitNetwork:
    """32×32 CIFAR: ResNet-20 (n = 3; 5 → ResNet-32, 9 → SDN's ResNet-56) with SDN's internal classifiers."""
    return _make(dict(in_chans=3, input_size=32, widths=(16, 32, 64), ic_pool=4),
                 dict(blocks_per_group=blocks_per_group, exit_blocks=exit_blocks, exits=exits,
                      exit_policy=exit_policy, num_classes=num_classes))


@register_model
def sdn_resnet_mnist(*, blocks_per_group: int = 2, exit_blocks: tuple[int, ...] | None = None,
                     exits: Literal["all", "last"] = "all", exit_policy: bool = False, num_classes: int = 10
                     ) -> MultiExitNetwork:
    """28×28 MNIST / Fashion-MNIST: ResNet-14 (n = 2), 16 / 32 / 64 channels at 28 / 14 / 7, SDN's ICs."""
    return _make(dict(in_chans=1, input_size=28, widths=(16, 32, 64), ic_pool=4),
                 dict(blocks_per_group=blocks_per_group, exit_blocks=exit_blocks, exits=exits,
                      exit_policy=exit_policy, num_classes=num_classes))


@register_model
def test_sdn_resnet(*, blocks_per_group: int = 1, exit_blocks: tuple[int, ...] | None = None,
                    exits: Literal["all", "last"] = "all", exit_policy: bool = False, num_classes: int = 10
                    ) -> MultiExitNetwork:
    """Tiny variant for tests: 3 blocks (4 / 8 / 8 channels) on 1×8×8 inputs, ICs after blocks 0 and 1."""
    return _make(dict(in_chans=1, input_size=8, widths=(4, 8, 8), ic_pool=2),
                 dict(blocks_per_group=blocks_per_group, exit_blocks=exit_blocks, exits=exits,
                      exit_policy=exit_policy, num_classes=num_classes))
