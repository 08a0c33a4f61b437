"""A plain multi-exit ConvNet (BranchyNet-style side branches on a VGG-like backbone).

Paper: S. Teerapittayanon, B. McDanel, H. T. Kung, "BranchyNet: Fast Inference via Early Exiting from Deep Neural
Networks", ICPR 2016, arXiv:1709.01686.

The backbone is a list of stages, each ``depth`` conv-BN-ReLU layers, the first strided where the resolution
halves; a pooled linear exit follows every stage. ``exits="last"`` gives the static network of the same design,
and ``num_stages`` truncates it: the family of static baselines the dynamic curve is compared against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from dynaneural.layers import ConvBNAct, PooledLinearHead
from dynaneural.registry import register_model
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

__all__ = ["ExitConvNetConfig", "build_exit_convnet"]


@dataclass(frozen=True)
class ExitConvNetConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths: channels of each stage. strides: stride of each stage's first layer. depth: conv layers per stage.
    head_pool: exit classifiers pool to head_pool × head_pool before their linear layer.
    num_stages: keep only the first num_stages stages (None = all).
    exits: ``"all"`` (an exit after every stage) or ``"last"`` (static network).
    exit_policy: build learned exit-policy heads.
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 1, 1)
    depth: int = 2
    head_pool: int = 2
    num_stages: int | None = None
    exits: Literal["all", "last"] = "all"
    exit_policy: bool = False

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.strides):
            raise ValueError(f"widths {self.widths} and strides {self.strides} must have the same length")
        if self.num_stages is not None and not 1 <= self.num_stages <= len(self.widths):
            raise ValueError(f"num_stages must be in [1, {len(self.widths)}], got {self.num_stages}")
        if self.exits not in ("all", "last"):
            raise ValueError(f"exits must be 'all' or 'last', got {self.exits!r}")
        if self.depth < 1:
            raise ValueError("depth must be >= 1")


def build_exit_convnet(cfg: ExitConvNetConfig) -> MultiExitNetwork:
    n = cfg.num_stages or len(cfg.widths)
    stages: list[nn.Module] = []
    prev = cfg.in_chans
    for w, s in zip(cfg.widths[:n], cfg.strides[:n], strict=True):
        layers = [ConvBNAct(prev, w, stride=s)] + [ConvBNAct(w, w) for _ in range(cfg.depth - 1)]
        stages.append(nn.Sequential(*layers))
        prev = w
    exit_at = range(n) if cfg.exits == "all" else [n - 1]
    heads = {i: PooledLinearHead(cfg.widths[i], cfg.num_classes, pool=cfg.head_pool) for i in exit_at}
    return MultiExitNetwork(stages=stages, heads=heads, num_classes=cfg.num_classes,
                            input_shape=(cfg.in_chans, cfg.input_size, cfg.input_size), exit_policy=cfg.exit_policy,
                            config=asdict(cfg))


def _make(defaults: dict, overrides: dict) -> MultiExitNetwork:
    return build_exit_convnet(ExitConvNetConfig(**{**defaults, **overrides}))


@register_model
def exit_convnet_digits(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                        exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """8×8 scikit-learn digits: 4 stages (16, 32, 64, 128 channels), ~0.9 MFLOPs at full depth."""
    return _make(dict(in_chans=1, input_size=8, widths=(16, 32, 64, 128), strides=(1, 2, 1, 1), head_pool=2),
                 dict(num_stages=num_stages, exits=exits, exit_policy=exit_policy, num_classes=num_classes))


@register_model
def exit_convnet_mnist(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                       exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """28×28 MNIST / Fashion-MNIST: 4 stages (16, 32, 64, 128 channels)."""
    return _make(dict(in_chans=1, input_size=28, widths=(16, 32, 64, 128), strides=(2, 2, 1, 1), head_pool=2),
                 dict(num_stages=num_stages, exits=exits, exit_policy=exit_policy, num_classes=num_classes))


@register_model
def test_exit_convnet(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                      exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """Tiny variant for tests: 3 stages on 1×8×8 inputs."""
    return _make(dict(in_chans=1, input_size=8, widths=(4, 8, 8), strides=(1, 2, 1), depth=1, head_pool=1),
                 dict(num_stages=num_stages, exits=exits, exit_policy=exit_policy, num_classes=num_classes))
