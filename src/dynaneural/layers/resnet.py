"""A small CIFAR ResNet (basic blocks, three stages): the backbone of the layer-skipping methods.

Paper: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385 (Sec. 4.2, the 6n+2-layer CIFAR networks: ResNet-20 for n = 3, ResNet-32 for n = 5, ResNet-110
for n = 18).

Layout::

    stem: 3×3 conv-BN-ReLU to widths[0] channels
    len(widths) stages of n basic blocks; the first block of every stage after the first halves the resolution
    basic block: relu(BN(conv3×3(relu(BN(conv3×3(h))))) + shortcut(h)),
                 shortcut = identity, or 1×1 conv-BN where the shape changes (He et al.'s option B)
    head: global average pool, linear

The model is kept as three explicit pieces (``stem``, ``blocks``, ``head``) rather than one ``nn.Sequential`` so that
the layer-skipping wrappers (:mod:`dynaneural.sample_wise.layer_skip`) can run the blocks one at a time, and
:func:`block_costs` gives each piece's analytic FLOPs (the library's counter) for their cost ledgers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dynaneural.compute.flops import static_flops
from dynaneural.layers.blocks import ConvBNAct

__all__ = ["AvgPoolTo", "BasicBlock", "CifarResNet", "CifarResNetConfig", "ResNetCosts", "block_costs"]


class AvgPoolTo(nn.Module):
    """Average pooling to ``size`` × ``size`` (global pooling for size 1).

    Where the windows tile the map it is a reshape and a mean, several times faster on CPU than the generic
    adaptive kernel for the small maps of gates and heads (this matters: a gate runs for every sample at every
    block). Counted like average pooling: one FLOP per input element.
    """

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.size = int(size)
        self._fallback = nn.AdaptiveAvgPool2d(self.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, size, size)
        b, c, h, w = x.shape
        p = self.size
        if p == 1:
            return x.mean((2, 3), keepdim=True)
        if h % p == 0 and w % p == 0:
            return x.reshape(b, c, p, h // p, p, w // p).mean((3, 5))
        return self._fallback(x)

    def flops(self, inputs: tuple[object, ...], output: object) -> float:
        x = inputs[0]
        assert isinstance(x, torch.Tensor)
        return float(x.numel())


class BasicBlock(nn.Module):
    """The ResNet basic block. ``is_identity_shape`` says whether skipping it (output = input) is well defined."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1) -> None:
        super().__init__()
        # ConvBNAct is an nn.Sequential(conv, bn, act): fold_batch_norms can fold both pairs for inference.
        self.conv1 = ConvBNAct(in_chs, out_chs, stride=stride)
        self.conv2 = ConvBNAct(out_chs, out_chs, act_layer=nn.Identity)
        self.is_identity_shape = stride == 1 and in_chs == out_chs
        self.shortcut: nn.Module = (nn.Identity() if self.is_identity_shape
                                    else ConvBNAct(in_chs, out_chs, kernel_size=1, stride=stride, act_layer=nn.Identity))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


@dataclass(frozen=True)
class CifarResNetConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths: channels of each stage. blocks_per_stage: n, basic blocks per stage (depth 6n+2 for three stages).
    """

    in_chans: int = 3
    input_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 3

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be non-empty and positive, got {self.widths}")
        if self.blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        if self.input_size < 2 ** (len(self.widths) - 1):
            raise ValueError(f"input_size {self.input_size} is too small for {len(self.widths)} stages")

    @property
    def depth(self) -> int:
        return 2 * len(self.widths) * self.blocks_per_stage + 2


class CifarResNet(nn.Module):
    """The static CIFAR ResNet (also the static twin of every layer-skipping model built on it)."""

    def __init__(self, cfg: CifarResNetConfig | None = None, **kwargs: object) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else CifarResNetConfig(**kwargs)  # type: ignore[arg-type]
        self.config = cfg
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.stem = ConvBNAct(cfg.in_chans, cfg.widths[0])
        blocks: list[BasicBlock] = []
        prev = cfg.widths[0]
        for s, w in enumerate(cfg.widths):
            for i in range(cfg.blocks_per_stage):
                blocks.append(BasicBlock(prev, w, stride=2 if s > 0 and i == 0 else 1))
                prev = w
        self.blocks = nn.ModuleList(blocks)
        self.pool = AvgPoolTo(1)
        self.fc = nn.Linear(prev, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def head(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.fc(self.pool(h).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def to_dict(self) -> dict[str, object]:
        return asdict(self.config)


@dataclass(frozen=True)
class ResNetCosts:
    """Analytic FLOPs per sample of each piece of a :class:`CifarResNet`.

    Attributes:
        stem: the stem. blocks: one entry per block. head: pooling and classifier.
        block_inputs: the per-sample input shape of every block (for the gates that read it).
    """

    stem: float
    blocks: tuple[float, ...]
    head: float
    block_inputs: tuple[tuple[int, ...], ...] = field(default_factory=tuple)

    @property
    def total(self) -> float:
        return self.stem + sum(self.blocks) + self.head


@torch.no_grad()
def block_costs(net: CifarResNet) -> ResNetCosts:
    """FLOPs per sample of the stem, every block and the head, counted by the library's analytic counter on a
    one-sample example (so they follow whatever the modules are now, e.g. after batch-norm folding)."""
    was_training = net.training
    net.eval()
    try:
        p = next(net.parameters())
        h = torch.zeros(1, *net.input_shape, dtype=p.dtype, device=p.device)
        stem = static_flops(net.stem, h)
        h = net.stem(h)
        blocks, shapes = [], []
        for block in net.blocks:
            shapes.append(tuple(h.shape[1:]))
            blocks.append(static_flops(block, h))
            h = block(h)
        head = static_flops(_Head(net), h)
    finally:
        net.train(was_training)
    return ResNetCosts(stem=stem, blocks=tuple(blocks), head=head, block_inputs=tuple(shapes))


class _Head(nn.Module):
    """The head as a module, so the counter sees the pooling and the linear layer."""

    def __init__(self, net: CifarResNet) -> None:
        super().__init__()
        self.pool, self.fc = net.pool, net.fc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(h).flatten(1))
