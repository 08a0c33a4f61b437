"""A CNN whose last stages carry patch-level mixture-of-experts feed-forward blocks: every pixel of a feature map
is a token routed to its experts.

Papers: C. Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021, arXiv:2106.05974
(V-MoE: image patches routed to MoE feed-forward layers); M. N. R. Chowdhury et al., "Patch-level Routing in
Mixture-of-Experts is Provably Sample-efficient for Convolutional Neural Networks", ICML 2023, arXiv:2306.04073
(pMoE: patches of a CNN's feature map routed to experts; experiments on CIFAR-10); routing, dispatch and losses in
:mod:`dynaneural.sample_wise.moe.moe_layer`.

Architecture: the small conv-BN-ReLU CNN of :mod:`dynaneural.sample_wise.dynamic_params.backbone` (the same
backbone the dynamic-parameter methods are compared on). After each of its last ``depth`` layers the feature map
(B, C, H, W) becomes H·W tokens of width C and goes through one residual block ``x + MoE(LN(x))`` of SwiGLU
experts; the tokens are a channels-last view of the map, so the next convolution reads them back without a copy.
The classifier is a linear head on the mean of the final-norm tokens. Routing groups are the samples (a group is one
feature map), so capacity and expert choice are decided per image and a sample's result never depends on the rest
of its batch.

Modes: ``simulate`` runs every expert on every token and selects; ``execute``/``train`` run the sorted dispatch (an
expert only sees its tokens). Per-sample cost = the convolutions, norms and head + each token's router and the
experts that processed it. With every decision on (``all_on``: top-k = E) the model equals its static twin, where
each MoE layer is the dense softmax mixture of all experts. The *dense twin of equal active FLOPs* that
``dynaneural bench moe-accuracy`` trains against it is this model with one expert of width ``top_k × hidden`` (plus
``shared_hidden`` with a shared expert).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dynaneural.contract import DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.layers import ConvBNAct
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, dataset_config
from dynaneural.sample_wise.moe.moe_layer import (
    DenseMixtureFFN,
    MoEFeedForward,
    MoEModelOutput,
    MoEStackMixin,
    RoutingKind,
)
from dynaneural.validation import check_batch

__all__ = ["MoEConvNetConfig", "MoEConvNet"]


@dataclass(frozen=True)
class MoEConvNetConfig:
    """Args:
    backbone: the conv-BN-ReLU layers (channels, strides, input size, classes).
    depth: MoE blocks, one after each of the backbone's last ``depth`` layers.
    hidden: width of each SwiGLU expert (the same in every block).
    num_experts, top_k, routing, capacity_factor, balance_coef, z_coef, router_jitter, straight_through_weights,
        shared_hidden: see ``MoEFeedForward``.
    """

    backbone: ConvNetConfig = ConvNetConfig()
    depth: int = 2
    hidden: int = 128
    num_experts: int = 8
    top_k: int = 2
    routing: RoutingKind = "top_k"
    capacity_factor: float | None = None
    balance_coef: float = 1e-2
    z_coef: float = 1e-3
    router_jitter: float = 0.0
    straight_through_weights: bool = False
    shared_hidden: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= len(self.backbone.widths):
            raise ValueError(f"depth must be in [1, {len(self.backbone.widths)}] (one MoE block after each of the "
                             f"backbone's last layers), got {self.depth}")


class _TokenBlock(nn.Module):
    """``x + FFN(LN(x))`` on the channels-last tokens of a feature map; ``ffn`` is an MoE layer or its mixture."""

    def __init__(self, dim: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = ffn


def _tokens(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C) (a view when ``h`` is channels-last)."""
    b, c = h.shape[:2]
    return h.permute(0, 2, 3, 1).reshape(b, -1, c)


def _feature_map(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H·W, C) → (B, C, H, W) shaped like ``like``, as a channels-last view of ``t``."""
    b, c, h, w = like.shape
    return t.view(b, h, w, c).permute(0, 3, 1, 2)


class _StaticMoEConvNet(nn.Module):
    """Static twin: the same weights, every MoE layer replaced by the dense mixture of its experts."""

    def __init__(self, model: MoEConvNet) -> None:
        super().__init__()
        self.layers = model.layers
        self.first_block = model.first_block
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": b.norm, "ffn": DenseMixtureFFN(b.ffn)})
                                    for b in model.blocks)
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, t = x, None
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i >= self.first_block:
                blk = self.blocks[i - self.first_block]
                t = _tokens(h)
                t = t + blk["ffn"](blk["norm"](t))
                h = _feature_map(t, h)
        assert t is not None
        return self.head(self.norm(t).mean(1))


class MoEConvNet(MoEStackMixin, DynamicModel):
    """CNN with patch-level MoE feed-forward blocks (see the module docstring).

    ``has_static_twin`` is True: the twin is the dense softmax mixture of all experts, which the model computes
    inside ``all_on()`` (top-k = E). With top-k < E no static network computes the same function.
    """

    def __init__(self, cfg: MoEConvNetConfig) -> None:
        super().__init__()
        self.config = cfg
        bb = cfg.backbone
        self.input_shape = (bb.in_chans, bb.input_size, bb.input_size)
        self.num_classes = bb.num_classes
        chans = (bb.in_chans, *bb.widths)
        sizes = bb.sizes()
        self.layers = nn.ModuleList(ConvBNAct(chans[i], chans[i + 1], stride=s) for i, s in enumerate(bb.strides))
        self.first_block = len(bb.widths) - cfg.depth
        self.blocks = nn.ModuleList(
            _TokenBlock(bb.widths[i], MoEFeedForward(
                bb.widths[i], cfg.hidden, cfg.num_experts, top_k=cfg.top_k, routing=cfg.routing,
                capacity_factor=cfg.capacity_factor, group_size=sizes[i + 1] ** 2, balance_coef=cfg.balance_coef,
                z_coef=cfg.z_coef, router_jitter=cfg.router_jitter,
                straight_through_weights=cfg.straight_through_weights, shared_hidden=cfg.shared_hidden))
            for i in range(self.first_block, len(bb.widths)))
        self.norm = nn.LayerNorm(bb.widths[-1])
        self.head = nn.Linear(bb.widths[-1], bb.num_classes)
        self._dense_flops = self._count_dense_flops()

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks]  # type: ignore[misc]

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> MoEModelOutput:
        mode = resolve_mode(self, mode)
        x = check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        h, t = x, None
        results = []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i >= self.first_block:
                blk = self.blocks[i - self.first_block]
                t = _tokens(h)
                res = blk.ffn(blk.norm(t), mode=mode)
                t = t + res.output
                results.append(res)
                h = _feature_map(t, h)
        assert t is not None
        logits = self.head(self.norm(t).mean(1))
        return self._moe_output(results, logits, batch_size=b, mode=mode)

    def to_static(self) -> nn.Module:
        return _StaticMoEConvNet(self)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


def _make(dataset: str, widths: tuple[int, ...] | list[int] | None, num_classes: int, **kw: object) -> MoEConvNet:
    return MoEConvNet(MoEConvNetConfig(backbone=dataset_config(dataset, num_classes=num_classes, widths=widths),
                                       **kw))  # type: ignore[arg-type]


@register_model
def moe_convnet_cifar10(*, num_experts: int = 8, top_k: int = 2, routing: RoutingKind = "top_k",
                        capacity_factor: float | None = None, shared_hidden: int | None = None,
                        straight_through_weights: bool = False, hidden: int = 128, depth: int = 2,
                        widths: tuple[int, ...] | list[int] | None = None, num_classes: int = 10) -> MoEConvNet:
    """CIFAR-10 32×32×3: conv layers 32-64-128-128 (strides 1-2-2-1), an MoE block of 8 SwiGLU experts (width 128,
    top-2) on the 64 pixel tokens after each of the last two."""
    return _make("cifar10", widths, num_classes, num_experts=num_experts, top_k=top_k, routing=routing,
                 capacity_factor=capacity_factor, shared_hidden=shared_hidden,
                 straight_through_weights=straight_through_weights, hidden=hidden, depth=depth)


@register_model
def moe_convnet_mnist(*, num_experts: int = 8, top_k: int = 2, routing: RoutingKind = "top_k",
                      capacity_factor: float | None = None, shared_hidden: int | None = None,
                      straight_through_weights: bool = False, hidden: int = 128, depth: int = 2,
                      widths: tuple[int, ...] | list[int] | None = None, num_classes: int = 10) -> MoEConvNet:
    """MNIST 28×28: conv layers 32-64-128 (strides 1-2-2), an MoE block of 8 SwiGLU experts (width 128, top-2) after
    each of the last two (196 tokens of width 64, then 49 of width 128)."""
    return _make("mnist", widths, num_classes, num_experts=num_experts, top_k=top_k, routing=routing,
                 capacity_factor=capacity_factor, shared_hidden=shared_hidden,
                 straight_through_weights=straight_through_weights, hidden=hidden, depth=depth)


@register_model
def test_moe_convnet() -> MoEConvNet:
    """Tiny: 8×8 input, conv layers 4-8-8 (strides 1-2-1), MoE blocks of 4 experts (width 8), top-2, after the last
    two layers (16 tokens each)."""
    cfg = ConvNetConfig(in_chans=1, input_size=8, num_classes=10, widths=(4, 8, 8), strides=(1, 2, 1))
    return MoEConvNet(MoEConvNetConfig(backbone=cfg, depth=2, hidden=8, num_experts=4, top_k=2))


@register_model
def test_moe_convnet_capacity() -> MoEConvNet:
    """Tiny: as ``test_moe_convnet`` with one MoE block, top-1 and capacity factor 1 per image (tokens dropped)."""
    cfg = ConvNetConfig(in_chans=1, input_size=8, num_classes=10, widths=(4, 8), strides=(2, 1))
    return MoEConvNet(MoEConvNetConfig(backbone=cfg, depth=1, hidden=8, num_experts=4, top_k=1,
                                       capacity_factor=1.0))


@register_model
def test_moe_convnet_shared() -> MoEConvNet:
    """Tiny: as ``test_moe_convnet`` with a shared expert (width 8) beside top-1 of 4 routed experts (DeepSeekMoE)."""
    cfg = ConvNetConfig(in_chans=1, input_size=8, num_classes=10, widths=(4, 8, 8), strides=(1, 2, 1))
    return MoEConvNet(MoEConvNetConfig(backbone=cfg, depth=2, hidden=8, num_experts=4, top_k=1, shared_hidden=8))
