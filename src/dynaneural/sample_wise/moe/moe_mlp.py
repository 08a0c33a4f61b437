"""An MLP classifier with residual mixture-of-experts layers: each sample is one token routed to its experts.

Papers: N. Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer",
ICLR 2017, arXiv:1701.06538 (a sparsely gated MoE between dense layers); W. Fedus, B. Zoph, N. Shazeer, "Switch
Transformers", JMLR 2022, arXiv:2101.03961 (routing, load balancing); layer details in
:mod:`dynaneural.sample_wise.moe.moe_layer`.

The flattened input is projected to ``dim``, then ``depth`` residual blocks ``x + MoE(LN(x))``, a final norm and
a linear head. A sample is a single token here, so the routing group of a capacity factor or of expert choice
is the batch: with ``capacity_factor`` set (or expert choice) a sample's route depends on the other samples of
its batch, as in the papers. The default (top-k, dropless) is batch-independent, which the registered variants
use. A token whose assignments are all dropped passes through its block unchanged (the residual).

Static twin: every MoE layer as the dense softmax mixture of its experts (what ``all_on()`` computes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dynaneural.contract import DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.registry import register_model
from dynaneural.sample_wise.moe.moe_layer import (
    DenseMixtureFFN,
    MoEFeedForward,
    MoEModelOutput,
    MoEStackMixin,
    RoutingKind,
)
from dynaneural.validation import check_batch

__all__ = ["MoEMLPConfig", "MoEMLP"]


@dataclass(frozen=True)
class MoEMLPConfig:
    """Args:
    input_shape: per-sample input shape (flattened by the stem). num_classes: classes.
    dim: width of the residual stream. depth: MoE blocks. hidden: width of each SwiGLU expert.
    num_experts, top_k, routing, capacity_factor, balance_coef, z_coef, router_jitter, straight_through_weights,
        shared_hidden: see ``MoEFeedForward``.
    """

    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    dim: int = 128
    depth: int = 2
    hidden: int = 256
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
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


class _StaticMoEMLP(nn.Module):
    def __init__(self, model: MoEMLP) -> None:
        super().__init__()
        self.stem, self.norms, self.norm, self.head = model.stem, model.norms, model.norm, model.head
        self.ffns = nn.ModuleList(DenseMixtureFFN(m) for m in model.moes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.flatten(1))
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            h = h + ffn(norm(h))
        return self.head(self.norm(h))


class MoEMLP(MoEStackMixin, DynamicModel):
    """Residual MLP with MoE layers (see the module docstring). ``has_static_twin``: the dense mixture."""

    def __init__(self, cfg: MoEMLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = tuple(cfg.input_shape)
        self.num_classes = cfg.num_classes
        in_features = math.prod(cfg.input_shape)
        self.stem = nn.Linear(in_features, cfg.dim)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.depth))
        self.moes = nn.ModuleList(
            MoEFeedForward(cfg.dim, cfg.hidden, cfg.num_experts, top_k=cfg.top_k, routing=cfg.routing,
                           capacity_factor=cfg.capacity_factor, balance_coef=cfg.balance_coef, z_coef=cfg.z_coef,
                           router_jitter=cfg.router_jitter,
                           straight_through_weights=cfg.straight_through_weights, shared_hidden=cfg.shared_hidden)
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        # Dense parts per sample (nn.Linear: in·out; LayerNorm: 5 per element — the library's FLOPs rules).
        self._dense_flops = float(in_features * cfg.dim + (cfg.depth + 1) * 5 * cfg.dim + cfg.dim * cfg.num_classes)

    def moe_layers(self) -> list[MoEFeedForward]:
        return list(self.moes)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> MoEModelOutput:
        mode = resolve_mode(self, mode)
        x = check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        h = self.stem(x.flatten(1))  # (B, dim): one token per sample
        results = []
        for norm, moe in zip(self.norms, self.moes, strict=True):
            res = moe(norm(h), mode=mode)
            h = h + res.output
            results.append(res)
        logits = self.head(self.norm(h))
        return self._moe_output(results, logits, batch_size=b, mode=mode)

    def to_static(self) -> nn.Module:
        return _StaticMoEMLP(self)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


def _make(defaults: dict, overrides: dict) -> MoEMLP:
    return MoEMLP(MoEMLPConfig(**{**defaults, **overrides}))


@register_model
def moe_mlp_mnist(*, num_experts: int = 8, top_k: int = 2, routing: RoutingKind = "top_k",
                  capacity_factor: float | None = None, shared_hidden: int | None = None,
                  dim: int = 128, hidden: int = 256, depth: int = 2,
                  num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> MoEMLP:
    """MNIST / Fashion-MNIST: 784 → 128, 2 MoE blocks of 8 SwiGLU experts (width 256), top-2."""
    return _make({}, dict(num_experts=num_experts, top_k=top_k, routing=routing, capacity_factor=capacity_factor,
                          shared_hidden=shared_hidden, dim=dim, hidden=hidden, depth=depth, num_classes=num_classes,
                          input_shape=tuple(input_shape)))


@register_model
def moe_mlp_digits(*, num_experts: int = 4, top_k: int = 1, routing: RoutingKind = "top_k",
                   capacity_factor: float | None = None, shared_hidden: int | None = None,
                   dim: int = 64, hidden: int = 64, depth: int = 2,
                   num_classes: int = 10) -> MoEMLP:
    """scikit-learn digits 8×8: 64 → 64, 2 MoE blocks of 4 experts, top-1 (Switch)."""
    return _make(dict(input_shape=(1, 8, 8)), dict(
        num_experts=num_experts, top_k=top_k, routing=routing, capacity_factor=capacity_factor,
        shared_hidden=shared_hidden, dim=dim, hidden=hidden, depth=depth, num_classes=num_classes))


@register_model
def test_moe_mlp() -> MoEMLP:
    """Tiny: 8×8 input, width 16, one MoE block of 4 experts (width 16), top-2 dropless."""
    return _make(dict(input_shape=(1, 8, 8), dim=16, depth=1, hidden=16, num_experts=4, top_k=2), {})
