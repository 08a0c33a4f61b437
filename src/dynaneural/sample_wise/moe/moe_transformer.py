"""A small pre-norm Transformer encoder whose feed-forward layers are mixtures of experts.

Papers: W. Fedus, B. Zoph, N. Shazeer, "Switch Transformers", JMLR 2022, arXiv:2101.03961 (MoE in place of the
Transformer FFN); A. Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv:2010.11929 (patch
tokens); routing variants in :mod:`dynaneural.sample_wise.moe.moe_layer`.

Inputs are images cut into ``patch_size`` × ``patch_size`` patches (e.g. MNIST 28×28 → 16 tokens of 7×7), or
token-id sequences when ``vocab_size`` is set. Every block is ``x + MHA(LN(x))`` then ``x + MoE(LN(x))``; the
classifier is a linear head on the mean of the final-norm tokens. Routing groups are the samples: capacity and
expert choice are decided per sequence, so a sample's result never depends on the rest of the batch.

Modes: ``simulate`` runs every expert on every token and selects; ``execute``/``train`` run the sorted dispatch
(an expert only sees its tokens). Per-sample cost = the dense parts (embedding, attention, norms, head) + each
token's router and the experts that processed it. With every decision on (``all_on``: top-k = E, or expert
capacity = sequence length) the model equals its static twin, where each MoE layer is the dense softmax mixture
of all experts (:class:`~dynaneural.sample_wise.moe.moe_layer.DenseMixtureFFN`).
"""

from __future__ import annotations

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
from dynaneural.validation import check_batch, check_token_batch

__all__ = ["MoETransformerConfig", "MoETransformer"]


@dataclass(frozen=True)
class MoETransformerConfig:
    """Args:
    input_shape: (C, H, W) of images, or (T,) of token sequences (with ``vocab_size``).
    patch_size: side of the square patches (images).
    vocab_size: token-id inputs when set.
    num_classes: classes.
    dim: token width. depth: blocks. heads: attention heads.
    hidden: width of each SwiGLU expert. num_experts: experts per MoE layer. top_k: experts per token.
    routing: ``"top_k"`` or ``"expert_choice"``. capacity_factor: see ``MoEFeedForward`` (None = dropless).
    balance_coef, z_coef, router_jitter: auxiliary-loss weights and Switch jitter.
    straight_through_weights: see ``MoEFeedForward`` (set by :func:`~dynaneural.sample_wise.moe.upcycle.upcycle`).
    shared_hidden: width of a shared SwiGLU expert every token runs (DeepSeekMoE; see ``MoEFeedForward``).
    """

    input_shape: tuple[int, ...] = (1, 28, 28)
    patch_size: int = 7
    vocab_size: int | None = None
    num_classes: int = 10
    dim: int = 64
    depth: int = 2
    heads: int = 4
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
        if self.vocab_size is None:
            if len(self.input_shape) != 3:
                raise ValueError(f"image input_shape must be (C, H, W), got {self.input_shape}")
            _, h, w = self.input_shape
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(f"patch_size {self.patch_size} must divide the image size {h}×{w}")
        elif len(self.input_shape) != 1:
            raise ValueError(f"token input_shape must be (T,), got {self.input_shape}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")

    @property
    def num_tokens(self) -> int:
        if self.vocab_size is not None:
            return self.input_shape[0]
        _, h, w = self.input_shape
        return (h // self.patch_size) * (w // self.patch_size)


class PatchEmbed(nn.Module):
    """(B, C, H, W) → (B, T, dim): non-overlapping p×p patches, flattened and projected."""

    def __init__(self, in_chans: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_chans * patch * patch, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return self.proj(x)  # (B, T, dim)


class TokenEmbed(nn.Module):
    """(B, T) ids → (B, T, dim) by table lookup (no multiply-accumulate: 0 FLOPs)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)

    def flops(self, inputs: tuple, output: torch.Tensor) -> float:
        return 0.0


class MoEBlock(nn.Module):
    """Pre-norm Transformer block with an MoE feed-forward layer."""

    def __init__(self, dim: int, heads: int, moe: MoEFeedForward) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.moe = moe

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class _StaticBlock(nn.Module):
    def __init__(self, block: MoEBlock) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = block.norm1, block.attn, block.norm2
        self.ffn = DenseMixtureFFN(block.moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


class _StaticMoETransformer(nn.Module):
    """Static twin: the same weights, every MoE layer replaced by the dense mixture of its experts."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__()
        self.embed, self.pos = model.embed, model.pos
        self.blocks = nn.ModuleList(_StaticBlock(b) for b in model.blocks)
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(1))


class MoETransformer(MoEStackMixin, DynamicModel):
    """Transformer encoder classifier with MoE feed-forward layers (see the module docstring).

    ``has_static_twin`` is True: the twin is the dense softmax mixture of all experts, which the model computes
    inside ``all_on()`` (top-k = E). With top-k < E no static network computes the same function.
    """

    def __init__(self, cfg: MoETransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = tuple(cfg.input_shape)
        self.num_classes = cfg.num_classes
        self.num_tokens = cfg.num_tokens
        if cfg.vocab_size is not None:
            self.input_dtype = torch.long
            self.vocab_size = cfg.vocab_size
            self.embed: nn.Module = TokenEmbed(cfg.vocab_size, cfg.dim)
        else:
            self.embed = PatchEmbed(cfg.input_shape[0], cfg.patch_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(
            MoEBlock(cfg.dim, cfg.heads, MoEFeedForward(
                cfg.dim, cfg.hidden, cfg.num_experts, top_k=cfg.top_k, routing=cfg.routing,
                capacity_factor=cfg.capacity_factor, group_size=self.num_tokens, balance_coef=cfg.balance_coef,
                z_coef=cfg.z_coef, router_jitter=cfg.router_jitter,
                straight_through_weights=cfg.straight_through_weights, shared_hidden=cfg.shared_hidden))
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self._dense_flops = self._count_dense_flops()

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.moe for b in self.blocks]

    def _check(self, x: object) -> torch.Tensor:
        if self.vocab_size is not None:
            x = check_token_batch(x, vocab_size=self.vocab_size)
            if x.shape[1] != self.num_tokens:
                raise ValueError(f"tokens must have shape (batch, {self.num_tokens}), got {tuple(x.shape)}")
            return x
        return check_batch(x, input_shape=self.input_shape)

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> MoEModelOutput:
        mode = resolve_mode(self, mode)
        x = self._check(x)
        b = x.shape[0]
        h = self.embed(x) + self.pos  # (B, T, dim)
        results = []
        for blk in self.blocks:
            h = blk.attend(h)
            res = blk.moe(blk.norm2(h), mode=mode)
            h = h + res.output
            results.append(res)
        logits = self.head(self.norm(h).mean(1))
        return self._moe_output(results, logits, batch_size=b, mode=mode)

    def to_static(self) -> nn.Module:
        return _StaticMoETransformer(self)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


def _make(defaults: dict, overrides: dict) -> MoETransformer:
    return MoETransformer(MoETransformerConfig(**{**defaults, **overrides}))


@register_model
def moe_transformer_mnist(*, num_experts: int = 8, top_k: int = 2, routing: RoutingKind = "top_k",
                          capacity_factor: float | None = None, shared_hidden: int | None = None,
                          dim: int = 64, hidden: int = 128, depth: int = 2,
                          num_classes: int = 10) -> MoETransformer:
    """MNIST 28×28 as 16 patches of 7×7; 2 blocks of width 64, 8 SwiGLU experts of width 128, top-2."""
    return _make(dict(input_shape=(1, 28, 28), patch_size=7), dict(
        num_experts=num_experts, top_k=top_k, routing=routing, capacity_factor=capacity_factor,
        shared_hidden=shared_hidden, dim=dim, hidden=hidden, depth=depth, num_classes=num_classes))


@register_model
def moe_transformer_cifar10(*, num_experts: int = 8, top_k: int = 2, routing: RoutingKind = "top_k",
                            capacity_factor: float | None = None, shared_hidden: int | None = None,
                            dim: int = 64, hidden: int = 128, depth: int = 2,
                            patch_size: int = 4, num_classes: int = 10) -> MoETransformer:
    """CIFAR-10 32×32×3 as 64 patches of 4×4; 2 blocks of width 64, 8 SwiGLU experts of width 128, top-2."""
    return _make(dict(input_shape=(3, 32, 32)), dict(
        patch_size=patch_size, num_experts=num_experts, top_k=top_k, routing=routing,
        capacity_factor=capacity_factor, shared_hidden=shared_hidden, dim=dim, hidden=hidden, depth=depth,
        num_classes=num_classes))


@register_model
def moe_transformer_tokens(*, vocab_size: int = 1000, seq_len: int = 32, num_classes: int = 2,
                           num_experts: int = 8, top_k: int = 2, routing: RoutingKind = "top_k",
                           capacity_factor: float | None = None, shared_hidden: int | None = None,
                           dim: int = 64, hidden: int = 128,
                           depth: int = 2) -> MoETransformer:
    """Token-id sequences (B, seq_len) → classes; 8 SwiGLU experts, top-2."""
    return _make(dict(input_shape=(seq_len,), vocab_size=vocab_size), dict(
        num_classes=num_classes, num_experts=num_experts, top_k=top_k, routing=routing,
        capacity_factor=capacity_factor, shared_hidden=shared_hidden, dim=dim, hidden=hidden, depth=depth))


_TINY = dict(input_shape=(1, 8, 8), patch_size=4, dim=16, depth=1, heads=2, hidden=16, num_experts=4)


@register_model
def test_moe_transformer() -> MoETransformer:
    """Tiny: 4 patch tokens, 4 experts, top-2 with capacity factor 1 per sample (some tokens are dropped)."""
    return _make({**_TINY, "top_k": 2, "capacity_factor": 1.0}, {})


@register_model
def test_moe_transformer_ec() -> MoETransformer:
    """Tiny: expert-choice routing per sample (each expert takes 2 of the 4 tokens)."""
    return _make({**_TINY, "routing": "expert_choice", "capacity_factor": 2.0}, {})


@register_model
def test_moe_transformer_tokens() -> MoETransformer:
    """Tiny: token ids (length 6, vocabulary 50), top-1 dropless."""
    return _make({**_TINY, "input_shape": (6,), "vocab_size": 50, "num_classes": 3, "top_k": 1}, {})



@register_model
def test_moe_transformer_shared() -> MoETransformer:
    """Tiny: top-1 with capacity factor 1 (tokens dropped) beside a shared expert of width 8 that every token runs."""
    return _make({**_TINY, "top_k": 1, "capacity_factor": 1.0, "shared_hidden": 8}, {})
