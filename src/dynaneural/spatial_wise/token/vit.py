"""A small Vision Transformer, and the ragged token layout every token-level method executes in.

Backbone: A. Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021, arXiv:2010.11929 (patch embedding, class token, learned position embedding, pre-norm blocks), at the
DeiT-tiny proportions scaled down for 28×28 MNIST (7×7 patches of 4×4) or 32×32 CIFAR-10 (8×8 patches of 4×4).
Optional convolutional stem (``stem="conv"``): T. Xiao et al., "Early Convolutions Help Transformers See Better",
NeurIPS 2021, arXiv:2106.14881 — the patchify convolution replaced by stride-2 3×3 convolutions (batch norm, ReLU)
and a 1×1 projection; same tokens, same grid, a few % more FLOPs, and it trains much faster from scratch.

Ragged execution. After per-sample pruning, halting or merging, every sample keeps its own number of tokens.
:class:`RaggedLayout` stores them *packed*: the kept tokens of all samples in one (T, D) matrix, sample after
sample, in their original order, so every token-wise op (layer norm, qkv, projection, MLP — ~90 % of a block's
FLOPs) runs on exactly the tokens that were kept, without any padding. Only attention needs a rectangular
layout: the q/k/v rows are scattered into (R, n_max, ...) padded to the longest row *of this batch* and the
padded keys get a ``-inf`` additive bias (a key-padding mask: they receive zero attention weight, so they
contribute nothing), then the outputs are gathered back to the packed rows. Rows (samples) that have no token
left are dropped from the layout altogether. Per-sample cost is charged from each sample's own count: a block
costs ``a·n + 2·D·n²`` FLOPs for ``n`` tokens (attention is quadratic in the sample's own count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import register_flops_rule

__all__ = ["Attention", "AttentionCore", "Block", "Mlp", "PatchEmbed", "RaggedLayout", "ViTConfig", "ViTCost",
           "VisionTransformer", "init_vit_weights", "ragged_attention", "ragged_block"]


@dataclass(frozen=True)
class ViTConfig:
    """Args:
    in_chans: input channels. img_size: input height = width. patch_size: square patch side (divides img_size).
    dim: embedding width D. depth: number of blocks. heads: attention heads (divide dim). mlp_ratio: MLP hidden
    width over D. num_classes: classes.
    """

    in_chans: int = 1
    img_size: int = 28
    patch_size: int = 4
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10
    stem: str = "patch"

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"a conv stem needs a power-of-two patch_size >= 2, got {self.patch_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        if self.dim % self.heads:
            raise ValueError(f"heads {self.heads} must divide dim {self.dim}")
        if self.depth < 1 or self.dim < 4:
            raise ValueError("depth must be >= 1 and dim >= 4")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """Patch tokens plus the class token."""
        return self.num_patches + 1

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def stem_channels(self) -> tuple[int, ...]:
        """Output channels of the conv stem's stride-2 3×3 convolutions (log2 patch_size of them), widening to
        D/2 before the 1×1 projection to D; empty for the patchify stem."""
        if self.stem != "conv":
            return ()
        k = self.patch_size.bit_length() - 1
        return tuple(max(8, self.dim >> (k - i)) for i in range(k))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------- layers
class PatchEmbed(nn.Module):
    """Image → tokens (B, C, H, W) → (B, N, D): non-overlapping patches and a linear embedding (a strided conv),
    or with ``stem="conv"`` stride-2 3×3 conv + BN + ReLU layers down to the same grid and a 1×1 projection."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.stem == "patch":
            self.proj: nn.Module = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
            return
        layers: list[nn.Module] = []
        c_in = cfg.in_chans
        for c in cfg.stem_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        layers.append(nn.Conv2d(c_in, cfg.dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, g, g) → (B, N, D)


class AttentionCore(nn.Module):
    """softmax(q kᵀ / √d + bias) v. A module of its own so the FLOPs counter sees its 2·Nq·Nk·D MACs.

    ``bias`` is an additive key bias broadcast to (B, H, Nq, Nk): ``-inf`` masks a key out (padding, a pruned
    or halted token), ``log s`` is ToMe's proportional attention. ``policy`` (B, Nk) in [0, 1] is DynamicViT's
    differentiable attention masking used in training (Rao et al., Eq. 9): the weights are multiplied by the
    keep policy (each query always keeps itself) and renormalised.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                policy: torch.Tensor | None = None) -> torch.Tensor:
        if policy is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        n = k.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
        if bias is not None:
            scores = scores + bias
        eye = torch.eye(n, dtype=scores.dtype, device=scores.device).view(1, 1, n, n)
        pol = policy.view(policy.shape[0], 1, 1, n)
        pol = pol + (1.0 - pol) * eye
        w = torch.exp(scores - scores.amax(-1, keepdim=True)) * pol
        eps = 1e-6
        w = (w + eps / n) / (w.sum(-1, keepdim=True) + eps)
        return w @ v


@register_flops_rule(AttentionCore)
def _attention_core_flops(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    q, k = inputs[0], inputs[1]
    # q·kᵀ and the weighted sum over v: Nq·Nk·dh MACs each, per head and sample.
    return float(2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3])


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, D)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3D) → q, k, v each (B, H, N, dh)."""
        b, n, three_d = qkv.shape
        qkv = qkv.view(b, n, 3, self.heads, three_d // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, policy: torch.Tensor | None = None,
                return_metric: bool = False) -> Any:
        b, n, d = x.shape
        q, k, v = self.split(self.qkv(x))
        o = self.core(q, k, v, bias, policy).transpose(1, 2).reshape(b, n, d)
        out = self.proj(o)
        if return_metric:  # ToMe's similarity metric: the keys, averaged over heads, (B, N, dh)
            return out, k.mean(1)
        return out


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, cfg.hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, policy: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias, policy)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """The static ViT: the static twin of every token-level model (same weights, every token, every block)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(init_vit_weights)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → tokens (B, 1 + N, D): class token first, position embedding added."""
        t = self.patch_embed(x)
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], 1) + self.pos_embed

    def classify(self, cls: torch.Tensor) -> torch.Tensor:
        """Final norm and linear head on the class token (B, D) only (the other tokens' norm is never used)."""
        return self.head(self.norm(cls))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        for blk in self.blocks:
            t = blk(t)
        return self.classify(t[:, 0])


def init_vit_weights(m: nn.Module) -> None:
    """ViT initialisation: truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class ViTCost:
    """Analytic per-sample FLOPs of the ViT's pieces (the convention of :mod:`dynaneural.compute.flops`; tested
    equal to the hook-based count of the static twin)."""

    cfg: ViTConfig

    @property
    def embed(self) -> float:
        c = self.cfg
        if c.stem == "patch":
            return float(c.num_patches * c.dim * c.in_chans * c.patch_size ** 2)
        flops, c_in, side = 0.0, c.in_chans, c.img_size
        for ch in c.stem_channels:  # 3×3 stride-2 conv (padding 1), then batch norm's scale and shift
            side = (side - 1) // 2 + 1
            flops += side * side * ch * (c_in * 9 + 2)
            c_in = ch
        return flops + float(c.num_patches * c.dim * c_in)

    @property
    def head(self) -> float:
        return float(5 * self.cfg.dim + self.cfg.dim * self.cfg.num_classes)

    @property
    def per_token(self) -> float:
        """The token-wise part of a block: two layer norms, qkv, projection, MLP."""
        d, h = self.cfg.dim, self.cfg.hidden
        return float(10 * d + 4 * d * d + 2 * d * h)

    def block(self, n: torch.Tensor | float) -> torch.Tensor | float:
        """FLOPs of one block for a sample with ``n`` tokens: linear in n, plus 2·D·n² for attention."""
        return self.per_token * n + 2.0 * self.cfg.dim * n * n

    def static_total(self) -> float:
        n = float(self.cfg.num_tokens)
        return self.embed + self.cfg.depth * float(self.block(n)) + self.head


# ------------------------------------------------------------------------------------------- ragged layout
@dataclass
class RaggedLayout:
    """Where the packed tokens of a ragged batch sit.

    Token tensors that go with a layout are (T, ...) — every kept token of every row, row after row, in the
    original token order. ``R`` rows are the samples that still hold at least one token.

    Attributes:
        row: (T,) the row of each token.
        rank: (T,) position of each token within its row.
        orig: (T,) original token index (0 = class token, 1 + p = patch p).
        counts: (R,) tokens per row.
        sample: (R,) the input sample of each row.
        nmax: the longest row: attention pads to it.
        dense: every row holds ``nmax`` tokens (no padding needed).
    """

    row: torch.Tensor
    rank: torch.Tensor
    orig: torch.Tensor
    counts: torch.Tensor
    sample: torch.Tensor
    nmax: int
    dense: bool
    _pos: torch.Tensor | None = None
    _buckets: list[tuple[torch.Tensor, RaggedLayout]] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.row.shape[0])

    @classmethod
    def full(cls, batch: int, n: int, device: torch.device) -> RaggedLayout:
        """Every token of every sample (the layout before any decision)."""
        ar = torch.arange(n, device=device)
        rows = torch.arange(batch, device=device)
        return cls(row=rows.repeat_interleave(n), rank=ar.repeat(batch), orig=ar.repeat(batch),
                   counts=torch.full((batch,), n, dtype=torch.long, device=device), sample=rows, nmax=n, dense=True)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> tuple[RaggedLayout, torch.Tensor]:
        """Layout of the True entries of a (B, N) mask, and their flat indices into (B·N) (to gather tokens)."""
        b, n = mask.shape
        full = cls.full(b, n, mask.device)
        return full.select(mask.reshape(-1))

    def select(self, keep: torch.Tensor) -> tuple[RaggedLayout, torch.Tensor]:
        """Keep the tokens where ``keep`` (T,) is True; rows left empty are dropped.

        Returns the new layout and ``index`` (T',) into the current tokens: gather every token tensor with
        ``t.index_select(0, index)``.
        """
        index = keep.nonzero().squeeze(1)
        row = self.row.index_select(0, index)
        counts = torch.bincount(row, minlength=self.num_rows)
        nonempty = counts > 0
        n_rows = int(nonempty.sum())
        if n_rows < self.num_rows:  # compaction of rows: samples with nothing left leave the layout
            new_id = torch.cumsum(nonempty, 0) - 1
            row = new_id.index_select(0, row)
            sample = self.sample[nonempty]
            counts = counts[nonempty]
        else:
            sample = self.sample
        offsets = torch.cumsum(counts, 0) - counts
        rank = torch.arange(index.shape[0], device=keep.device) - offsets.index_select(0, row)
        nmax = int(counts.max()) if n_rows else 0
        dense = bool((counts == nmax).all()) if n_rows else True
        return RaggedLayout(row=row, rank=rank, orig=self.orig.index_select(0, index), counts=counts, sample=sample,
                            nmax=nmax, dense=dense), index

    @property
    def pos(self) -> torch.Tensor:
        """(T,) flat position of each token in the padded (R·nmax) layout."""
        if self._pos is None:
            self._pos = self.row * self.nmax + self.rank
        return self._pos

    def pad(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Packed (T, *F) → padded (R, nmax, *F) (padding filled with ``fill``)."""
        if self.dense:
            return t.reshape(self.num_rows, self.nmax, *t.shape[1:])
        out = t.new_full((self.num_rows * self.nmax, *t.shape[1:]), fill)
        return out.index_copy_(0, self.pos, t).view(self.num_rows, self.nmax, *t.shape[1:])

    def unpad(self, p: torch.Tensor) -> torch.Tensor:
        """Padded (R, nmax, *F) → packed (T, *F)."""
        flat = p.reshape(self.num_rows * self.nmax, *p.shape[2:])
        return flat if self.dense else flat.index_select(0, self.pos)

    def key_bias(self, log_size: torch.Tensor | None = None) -> torch.Tensor | None:
        """(R, 1, 1, nmax) additive key bias: ``-inf`` on padding, plus ``log_size`` (T,) of each key if given
        (ToMe's proportional attention). None when there is nothing to add."""
        if log_size is None:
            if self.dense:
                return None
            valid = torch.arange(self.nmax, device=self.counts.device) < self.counts[:, None]
            zero = torch.zeros((), device=valid.device)
            return torch.where(valid, zero, -math.inf).view(self.num_rows, 1, 1, self.nmax)
        return self.pad(log_size, fill=-math.inf).view(self.num_rows, 1, 1, self.nmax)

    def scatter_full(self, t: torch.Tensor, batch: int, n: int, fill: Any = 0) -> torch.Tensor:
        """Packed (T, *F) → (batch, n, *F) in input order and original token positions (for decisions)."""
        out = t.new_full((batch * n, *t.shape[1:]), fill)
        idx = self.sample.index_select(0, self.row) * n + self.orig
        return out.index_copy_(0, idx, t).view(batch, n, *t.shape[1:])

    def per_sample(self, batch: int) -> torch.Tensor:
        """(batch,) tokens each input sample holds (0 for samples that left)."""
        out = torch.zeros(batch, dtype=torch.long, device=self.counts.device)
        return out.index_copy_(0, self.sample, self.counts)


#: rows per length bucket in ragged attention (see :func:`ragged_attention`); 0 disables bucketing.
BUCKET_ROWS = 0


def _length_buckets(layout: RaggedLayout, rows_per_bucket: int) -> list[tuple[torch.Tensor, RaggedLayout]]:
    """Split the rows, sorted by length, into buckets of ``rows_per_bucket``: each bucket is its own layout
    (padded only to *its* longest row) with the indices of its tokens among the packed ones."""
    order = torch.argsort(layout.counts, stable=True)
    rank_of_row = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    bucket_of_token = rank_of_row.index_select(0, layout.row) // rows_per_bucket
    out = []
    for b in range((layout.num_rows + rows_per_bucket - 1) // rows_per_bucket):
        sub, index = layout.select(bucket_of_token == b)
        out.append((index, sub))
    return out


def ragged_attention(attn: Attention, h: torch.Tensor, layout: RaggedLayout, *, log_size: torch.Tensor | None = None,
                     return_metric: bool = False) -> Any:
    """Self-attention of packed tokens (T, D) within their own rows: q/k/v padded to the longest row, padded keys
    masked with ``-inf`` (they get zero weight), outputs gathered back to the packed rows.

    With ragged rows and more than ``BUCKET_ROWS`` of them, the rows are grouped by length into buckets of
    ``BUCKET_ROWS`` rows, each padded only to its own longest row (length bucketing): less wasted attention.
    The token-wise projections still run once on all packed tokens.
    """
    if not layout.dense and BUCKET_ROWS and layout.num_rows > BUCKET_ROWS and not return_metric:
        qkv_all = attn.qkv(h)
        o_all = torch.empty_like(h)
        if layout._buckets is None:
            layout._buckets = _length_buckets(layout, BUCKET_ROWS)
        for index, sub in layout._buckets:
            q, k, v = attn.split(sub.pad(qkv_all.index_select(0, index)))
            ls = None if log_size is None else log_size.index_select(0, index)
            o = attn.core(q, k, v, sub.key_bias(ls))
            o_all.index_copy_(0, index, sub.unpad(o.transpose(1, 2).reshape(sub.num_rows, sub.nmax, -1)))
        return attn.proj(o_all)
    qkv = layout.pad(attn.qkv(h))  # (R, nmax, 3D)
    q, k, v = attn.split(qkv)  # (R, H, nmax, dh)
    o = attn.core(q, k, v, layout.key_bias(log_size))  # (R, H, nmax, dh)
    o = layout.unpad(o.transpose(1, 2).reshape(layout.num_rows, layout.nmax, -1))  # (T, D)
    out = attn.proj(o)
    if return_metric:
        return out, layout.unpad(k.mean(1))  # (T, dh)
    return out


def ragged_block(blk: Block, x: torch.Tensor, layout: RaggedLayout) -> torch.Tensor:
    """A block on packed tokens (T, D): token-wise ops on exactly the kept tokens, attention per row."""
    x = x + ragged_attention(blk.attn, blk.norm1(x), layout)
    return x + blk.mlp(blk.norm2(x))


# ------------------------------------------------------------------------------------- shared model plumbing
def check_images(model: nn.Module, x: Any) -> torch.Tensor:
    """Validate an image batch for a token model (shape, dtype, emptiness, finiteness)."""
    from dynaneural.validation import check_batch

    return check_batch(x, input_shape=model.input_shape)  # type: ignore[arg-type]


def calibrate_token_knob(model: Any, x: torch.Tensor, *, budget: float, knob: str, lo: float, hi: float,
                         unit: str = "fraction", batch_size: int = 256) -> Any:
    """Fit one scalar buffer ``knob`` of a token model (a threshold) to a budget on validation images ``x``.

    ``unit``: ``fraction`` (mean FLOPs over the static twin's), ``flops``, or ``tokens`` (mean over blocks of
    the fraction of tokens a block processes). Uses :func:`dynaneural.calibration.calibrate_knob`.
    """
    from dynaneural.calibration.thresholds import calibrate_knob

    if unit not in ("fraction", "flops", "tokens"):
        raise ValueError(f"unit must be fraction, flops or tokens, got {unit!r}")
    buf: torch.Tensor = getattr(model, knob)
    old = float(buf)
    static = model.cost.static_total()
    was_training = model.training
    model.eval()

    def measure(value: float) -> float:
        buf.fill_(value)
        try:
            total, n = 0.0, 0
            with torch.inference_mode():
                for i in range(0, x.shape[0], batch_size):
                    out = model(x[i:i + batch_size], mode="execute")
                    if unit == "tokens":
                        total += float(out.decisions["tokens"].double().sum()) / (
                            model.cfg.vit.num_tokens * model.cfg.vit.depth)
                    else:
                        total += float(out.cost.sum()) / (static if unit == "fraction" else 1.0)
                    n += out.cost.shape[0]
            return total / n
        finally:
            buf.fill_(old)

    try:
        res = calibrate_knob(mean_cost=measure, set_knob=lambda v: buf.fill_(v), budget=budget, lo=lo, hi=hi,
                             unit=unit, current=old)
    finally:
        model.train(was_training)
    return res
