"""ToMe: token merging by bipartite soft matching, with per-sample thresholds.

Paper: D. Bolya, C.-Y. Fu, X. Dai, P. Zhang, C. Feichtenhofer, J. Hoffman, "Token Merging: Your ViT But Faster",
ICLR 2023, arXiv:2210.09461.

In every merging block, between attention and MLP (Sec. 3): the tokens are split alternately into sets A and B
(by their position among the sample's *current* tokens), each A token is matched to its most similar B token by
cosine similarity of the attention keys averaged over heads, and the chosen A tokens are merged into their
match by a size-weighted average (``x_B ← (s_B x_B + Σ s_A x_A) / (s_B + Σ s_A)``, sizes add). The class token is
never merged. Attention then uses *proportional attention*, ``softmax(q kᵀ/√d + log s)``, so a merged token
counts as the tokens it stands for.

The paper merges a fixed ``r`` tokens per block (the same for every image). Here a pair is merged when its
similarity is at least ``threshold`` (the knob calibration moves), optionally capped at the ``r`` most similar
pairs per block: each sample keeps its own number of tokens. ``threshold=-1`` with ``r`` set is the paper's rule.

Modes: simulate keeps the full (B, N) token grid, with merged-away tokens at size 0 (so ``log s = -inf`` masks
them out of attention) — the reference; execute keeps only the surviving tokens packed per sample
(:class:`~dynaneural.spatial_wise.token.vit.RaggedLayout`) and drops merged ones for good. Train mode runs the
simulate computation with gradients (ToMe trains through merging like a pooling op). Cost per sample: each
block at the sample's own token count, plus the matching (``|A|·|B|·dh + n·dh`` MACs); the weighted averages
are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.registry import register_model
from dynaneural.spatial_wise.token.vit import (
    RaggedLayout,
    VisionTransformer,
    ViTConfig,
    ViTCost,
    calibrate_token_knob,
    check_images,
    ragged_attention,
)

__all__ = ["ToMe", "ToMeConfig", "match_flops"]


@dataclass(frozen=True)
class ToMeConfig:
    """Args:
    vit: the backbone. threshold: merge an A token into its best B match when their cosine similarity is at
    least this. r: at most this many merges per block and sample (None = no cap). merge_layers: blocks that
    merge (None = every block but the last, whose merges nothing would use).
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    threshold: float = 0.9
    r: int | None = None
    merge_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.r is not None and self.r < 0:
            raise ValueError(f"r must be >= 0, got {self.r}")
        layers = self.merge_layers if self.merge_layers is not None else tuple(range(self.vit.depth - 1))
        if any(not 0 <= i < self.vit.depth for i in layers):
            raise ValueError(f"merge_layers must lie in [0, {self.vit.depth}), got {layers}")
        object.__setattr__(self, "merge_layers", tuple(int(i) for i in layers))


def match_flops(n: torch.Tensor, head_dim: int) -> torch.Tensor:
    """MACs of bipartite matching among ``n`` tokens (class token excluded from A): |A|·|B|·dh similarities plus
    n·dh for normalising the keys."""
    n_a = torch.div(n - 1, 2, rounding_mode="floor")
    n_b = torch.div(n, 2, rounding_mode="floor")
    return ((n_a * n_b + n) * head_dim).double()


def _cap(merge: torch.Tensor, score: torch.Tensor, r: int | None) -> torch.Tensor:
    """Keep only the ``r`` best-scoring candidates of each row (stable: ties go to the earlier token)."""
    if r is None:
        return merge
    s = torch.where(merge, score, torch.full_like(score, -math.inf))
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return merge & (place < r)


class ToMe(AllOnFlag, DynamicModel):
    """Token merging on a small ViT; see the module docstring."""

    def __init__(self, cfg: ToMeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vit)
        self.register_buffer("threshold", torch.tensor(float(cfg.threshold)))
        self.input_shape = cfg.vit.input_shape
        self.num_classes = cfg.vit.num_classes
        self.cost = ViTCost(cfg.vit)
        self.head_dim = cfg.vit.dim // cfg.vit.heads
        self._all_on = False

    # all_on() comes from AllOnFlag: No merging, no matching: the static ViT.

    def to_static(self) -> VisionTransformer:
        return self.vit

    def calibrate(self, x: torch.Tensor, *, budget: float, unit: str = "fraction", batch_size: int = 256) -> Any:
        """Fit the similarity ``threshold`` to a budget on ``x`` (lower thresholds merge more)."""
        return calibrate_token_knob(self, x, budget=budget, knob="threshold", lo=-1.0, hi=1.0001, unit=unit,
                                    batch_size=batch_size)

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        check_images(self, x)
        if mode is Mode.EXECUTE:
            return self._execute(x)
        return self._full(x, mode)

    def _merging(self, i: int) -> bool:
        return not self._all_on and i in self.cfg.merge_layers  # type: ignore[operator]

    def _full(self, x: torch.Tensor, mode: Mode) -> DynamicOutput:
        """Train / simulate: the full token grid; merged-away tokens have size 0 (masked by log s = -inf)."""
        b, n = x.shape[0], self.cfg.vit.num_tokens
        thr = float(self.threshold)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.embed + self.cost.head)
        t = self.vit.embed(x)
        size = t.new_ones(b, n)
        active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        group = torch.arange(n, device=x.device).expand(b, n).clone()
        tokens = []
        merged_any = False
        for i, blk in enumerate(self.vit.blocks):
            count = active.sum(1)
            tokens.append(count)
            ledger.charge(self.cost.block(count.double()))
            bias = size.log().view(b, 1, 1, n) if merged_any else None  # proportional attention
            a, metric = blk.attn(blk.norm1(t), bias, return_metric=True)
            t = t + a
            if self._merging(i):
                ledger.charge(match_flops(count, self.head_dim))
                rank = torch.cumsum(active, 1) - 1
                is_a = active & (rank % 2 == 0) & (rank > 0)
                is_b = active & (rank % 2 == 1)
                m = F.normalize(metric, dim=-1)
                scores = (m @ m.transpose(1, 2)).masked_fill(~is_b.unsqueeze(1), -math.inf)  # (B, N, N)
                node_max, node_idx = scores.max(-1)
                merge = _cap(is_a & (node_max >= thr), node_max, self.cfg.r)
                if bool(merge.any()):
                    merged_any = True
                    src = size * merge
                    num = t * size.unsqueeze(-1)
                    add_num = torch.zeros_like(num).scatter_add(1, node_idx.unsqueeze(-1).expand_as(num),
                                                                num * merge.unsqueeze(-1))
                    add_size = torch.zeros_like(size).scatter_add(1, node_idx, src)
                    received = add_size > 0
                    new_size = size + add_size
                    t = torch.where(received.unsqueeze(-1), (num + add_num) / new_size.clamp_min(1e-12).unsqueeze(-1), t)
                    size = torch.where(merge, torch.zeros_like(size), new_size)
                    active = active & ~merge
                    group = torch.where(merge.gather(1, group), node_idx.gather(1, group), group)
            t = t + blk.mlp(blk.norm2(t))
        logits = self.vit.classify(t[:, 0])
        return DynamicOutput(logits=logits, cost=ledger.flops, decisions={"tokens": torch.stack(tokens, 1),
                                                                          "group": group}, mode=mode)

    def _execute(self, x: torch.Tensor) -> DynamicOutput:
        """Execute: merged tokens leave the packed ragged batch; each sample keeps its own count."""
        b, n = x.shape[0], self.cfg.vit.num_tokens
        thr = float(self.threshold)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.embed + self.cost.head)
        t = self.vit.embed(x)
        layout = RaggedLayout.full(b, n, x.device)
        xp = t.reshape(b * n, -1)
        size = xp.new_ones(b * n)
        group = torch.arange(n, device=x.device).expand(b, n).clone()
        tokens = []
        merged_any = False
        for i, blk in enumerate(self.vit.blocks):
            tokens.append(layout.counts.clone())  # rows are never dropped: row r is sample r
            ledger.charge(self.cost.block(layout.counts.double()))
            a, metric = ragged_attention(blk.attn, blk.norm1(xp), layout, log_size=size.log() if merged_any else None,
                                         return_metric=True)
            xp = xp + a
            if self._merging(i):
                ledger.charge(match_flops(layout.counts, self.head_dim))
            if self._merging(i) and layout.nmax >= 3:
                mp = layout.pad(F.normalize(metric, dim=-1))  # (R, nmax, dh)
                a_m, b_m = mp[:, 2::2], mp[:, 1::2]  # A: ranks 2, 4, … (rank 0 = class token), B: ranks 1, 3, …
                col_a = torch.arange(2, layout.nmax, 2, device=x.device)
                col_b = torch.arange(1, layout.nmax, 2, device=x.device)
                valid_a = col_a < layout.counts[:, None]
                valid_b = col_b < layout.counts[:, None]
                scores = (a_m @ b_m.transpose(1, 2)).masked_fill(~valid_b.unsqueeze(1), -math.inf)  # (R, nA, nB)
                node_max, node_idx = scores.max(-1)
                merge = _cap(valid_a & (node_max >= thr), node_max, self.cfg.r)
                if bool(merge.any()):
                    merged_any = True
                    rr, ii = merge.nonzero(as_tuple=True)
                    inv = torch.full((layout.num_rows * layout.nmax,), -1, dtype=torch.long, device=x.device)
                    inv.index_copy_(0, layout.pos, torch.arange(layout.num_tokens, device=x.device))
                    src = inv[rr * layout.nmax + col_a[ii]]
                    dst = inv[rr * layout.nmax + col_b[node_idx[rr, ii]]]
                    num = xp * size.unsqueeze(-1)
                    num.index_add_(0, dst, num.index_select(0, src))
                    size = size.index_add(0, dst, size.index_select(0, src))
                    received = torch.zeros_like(size, dtype=torch.bool).index_fill_(0, dst, True)
                    xp = torch.where(received.unsqueeze(-1), num / size.unsqueeze(-1), xp)
                    mapping = torch.arange(n, device=x.device).expand(b, n).clone()
                    mapping[rr, layout.orig[src]] = layout.orig[dst]
                    group = mapping.gather(1, group)
                    keep = torch.ones(layout.num_tokens, dtype=torch.bool, device=x.device).index_fill_(0, src, False)
                    layout, index = layout.select(keep)
                    xp, size = xp.index_select(0, index), size.index_select(0, index)
            xp = xp + blk.mlp(blk.norm2(xp))
        cls = xp.index_select(0, (layout.rank == 0).nonzero().squeeze(1))
        logits = self.vit.classify(cls)
        return DynamicOutput(logits=logits, cost=ledger.flops, decisions={"tokens": torch.stack(tokens, 1),
                                                                          "group": group}, mode=Mode.EXECUTE)


def _build(vit: dict[str, Any], **kw: Any) -> ToMe:
    return ToMe(ToMeConfig(vit=ViTConfig(**vit), **kw))


@register_model
def tome_mnist(*, dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, threshold: float = 0.9,
               r: int | None = None, num_classes: int = 10, stem: str = "patch") -> ToMe:
    """MNIST / Fashion-MNIST: 7×7 patches of 4×4, D=64, 6 blocks (the DynamicViT backbone), merging in blocks 0–4.
    ``stem="conv"``: the convolutional stem (see ``ViTConfig``)."""
    return _build(dict(in_chans=1, img_size=28, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                       num_classes=num_classes, stem=stem), threshold=threshold, r=r)


@register_model
def tome_cifar10(*, dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, threshold: float = 0.9,
                 r: int | None = None, num_classes: int = 10,
                 stem: str = "patch") -> ToMe:
    """CIFAR-10: 8×8 patches of 4×4, D=128, 6 blocks.
    ``stem="conv"``: the convolutional stem (see ``ViTConfig``)."""
    return _build(dict(in_chans=3, img_size=32, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                       num_classes=num_classes, stem=stem), threshold=threshold, r=r)


@register_model
def test_tome(*, threshold: float = 0.2, r: int | None = None) -> ToMe:
    """Tiny variant for tests: 12×12 inputs, 3×3 patches, D=16, 3 blocks; a low threshold so random keys merge
    some pairs."""
    return _build(dict(in_chans=1, img_size=12, patch_size=4, dim=16, depth=3, heads=2, mlp_ratio=2.0, num_classes=5),
                  threshold=threshold, r=r)
