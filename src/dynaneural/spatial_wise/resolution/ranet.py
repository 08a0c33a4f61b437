"""RANet: a resolution-adaptive network — low resolution first, higher resolutions only when needed.

Paper: L. Yang, Y. Han, X. Chen, S. Song, J. Dai, G. Huang, "Resolution Adaptive Networks for Efficient
Inference", CVPR 2020, arXiv:2003.07326.

Sub-networks run from the lowest input resolution to the highest; each ends in a classifier (an exit). A sample
whose prediction is already confident leaves; the others go on to the next sub-network, which sees the image at
twice the resolution *and reuses the previous sub-network's features*: they are upsampled and fused (concatenated
and mixed by a 3×3 conv) with the new resolution's stem features (RANet's fusion of coarse into fine features).

Built on :class:`~dynaneural.sample_wise.early_exit.multi_exit.MultiExitNetwork`: each stage takes the full image
(carried along in the state) and downsamples it internally (average pooling, counted 1 FLOP per input element),
so exit rules, execute-mode compaction (samples that exit are dropped from the state, image included),
calibration to a budget and the cost ledger come from the early-exit machinery. ``exits="last"`` and
``num_stages`` give the static family (a single resolution, or the first k resolutions fused).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.layers import ConvBNAct, PooledLinearHead
from dynaneural.registry import register_model
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

__all__ = ["RANetConfig", "ResolutionStage", "build_ranet"]


@dataclass(frozen=True)
class RANetConfig:
    """Args:
    in_chans, input_size, num_classes: the data. scales: downsampling factor of each sub-network's input, from
    the coarsest (e.g. 4, 2, 1). widths: channels of each sub-network. depth: conv layers per sub-network after
    the stem/fusion. strides: stride of each sub-network's stem (the fine ones stride to stay cheap).
    num_stages: keep the first k sub-networks. exits: ``all`` or ``last`` (static).
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    scales: tuple[int, ...] = (4, 2, 1)
    widths: tuple[int, ...] = (32, 32, 32)
    depth: int = 2
    strides: tuple[int, ...] = (1, 1, 2)
    head_pool: int = 1
    num_stages: int | None = None
    exits: Literal["all", "last"] = "all"

    def __post_init__(self) -> None:
        if not (len(self.scales) == len(self.widths) == len(self.strides)):
            raise ValueError("scales, widths and strides must have the same length")
        if any(self.input_size % s for s in self.scales):
            raise ValueError(f"every scale must divide input_size {self.input_size}, got {self.scales}")
        if list(self.scales) != sorted(self.scales, reverse=True):
            raise ValueError(f"scales must go from coarse to fine (decreasing), got {self.scales}")
        if self.num_stages is not None and not 1 <= self.num_stages <= len(self.scales):
            raise ValueError(f"num_stages must be in [1, {len(self.scales)}]")
        if self.exits not in ("all", "last"):
            raise ValueError(f"exits must be 'all' or 'last', got {self.exits!r}")


class ResolutionStage(nn.Module):
    """One sub-network: downsample the image by ``scale``, stem conv, fuse the previous (coarser) features, convs.

    State in: the image (first stage) or ``[image, previous features]``; state out: ``[image, features]``, or the
    features alone for the last stage (nothing after it needs the image)."""

    def __init__(self, in_chans: int, width: int, *, scale: int, stride: int, depth: int, prev_width: int,
                 last: bool) -> None:
        super().__init__()
        self.down = nn.AvgPool2d(scale) if scale > 1 else nn.Identity()
        self.stem = ConvBNAct(in_chans, width, stride=stride)
        self.fuse = ConvBNAct(width + prev_width, width) if prev_width else None
        self.body = nn.Sequential(*[ConvBNAct(width, width) for _ in range(depth)])
        self.last = last

    def forward(self, state: Any) -> Any:
        x, prev = (state, None) if isinstance(state, torch.Tensor) else (state[0], state[1])
        h = self.stem(self.down(x))
        if self.fuse is not None and prev is not None:
            # Feature reuse: the coarse features, upsampled (nearest, no FLOPs) to this resolution and fused.
            h = self.fuse(torch.cat([h, F.interpolate(prev, size=h.shape[-2:], mode="nearest")], 1))
        h = self.body(h)
        return h if self.last else [x, h]


def build_ranet(cfg: RANetConfig) -> MultiExitNetwork:
    n = cfg.num_stages or len(cfg.scales)
    stages: list[nn.Module] = []
    for i in range(n):
        stages.append(ResolutionStage(cfg.in_chans, cfg.widths[i], scale=cfg.scales[i], stride=cfg.strides[i],
                                      depth=cfg.depth, prev_width=cfg.widths[i - 1] if i else 0, last=i == n - 1))
    exit_at = range(n) if cfg.exits == "all" else [n - 1]
    heads = {i: PooledLinearHead(cfg.widths[i], cfg.num_classes, pool=cfg.head_pool) for i in exit_at}
    return MultiExitNetwork(stages=stages, heads=heads, num_classes=cfg.num_classes,
                            input_shape=(cfg.in_chans, cfg.input_size, cfg.input_size), config=asdict(cfg))


def _make(defaults: dict, overrides: dict) -> MultiExitNetwork:
    return build_ranet(RANetConfig(**{**defaults, **overrides}))


@register_model
def ranet_mnist(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                num_classes: int = 10) -> MultiExitNetwork:
    """28×28 MNIST / Fashion-MNIST: sub-networks at 7×7, 14×14 and 28×28 (32 channels each, the finest strided)."""
    return _make(dict(in_chans=1, input_size=28, scales=(4, 2, 1), widths=(32, 48, 64), strides=(1, 1, 2), depth=2),
                 dict(num_stages=num_stages, exits=exits, num_classes=num_classes))


@register_model
def ranet_cifar10(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                  num_classes: int = 10) -> MultiExitNetwork:
    """32×32 CIFAR-10: sub-networks at 8×8, 16×16 and 32×32."""
    return _make(dict(in_chans=3, input_size=32, scales=(4, 2, 1), widths=(48, 64, 96), strides=(1, 1, 2), depth=3),
                 dict(num_stages=num_stages, exits=exits, num_classes=num_classes))


@register_model
def test_ranet(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
               num_classes: int = 10) -> MultiExitNetwork:
    """Tiny variant for tests: 1×8×8 inputs, sub-networks at 2×2, 4×4 and 8×8."""
    return _make(dict(in_chans=1, input_size=8, scales=(4, 2, 1), widths=(4, 6, 8), strides=(1, 1, 1), depth=1),
                 dict(num_stages=num_stages, exits=exits, num_classes=num_classes))
