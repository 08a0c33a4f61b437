"""Convolution computed only at active output positions: the execute-mode kernel of pixel-level dynamic networks.

Papers whose execution this implements: T. Verelst, T. Tuytelaars, "Dynamic Convolutions: Exploiting Spatial
Sparsity for Faster Inference", CVPR 2020, arXiv:1912.03203 (gather active positions, one matrix multiply,
scatter back); the same im2col-on-active-positions idea underlies M. Ren et al., "SBNet: Sparse Blocks Network
for Fast Inference", CVPR 2018, arXiv:1801.02108 (see ``sbnet.py`` for the tile variant).

How it runs (CPU, no custom extension):

1. the input is kept channels-last: ``x`` (B, H, W, C), contiguous, viewed as a (B·H·W, C) matrix of pixel
   rows (a free view of a channels-last tensor);
2. for the N active output positions (b, i, j), each of the kh kernel rows of the neighbourhood is a *run* of
   kw·C contiguous values starting at the flat pixel ``b·H·W + (i·s − p + di)·W + (j·s − p)``; **one**
   ``index_select`` on an overlapping strided view gathers the (N·kh, kw·C) runs, which *are* the
   (N, kh·kw·C) im2col matrix of the active positions, with no copy of the full unfolded input (a full
   ``unfold`` is 4–5× slower than the dense convolution here); the windows that cross the border read a
   zero-padded copy of the input, or, when they are few, are re-gathered tap by tap with the outside taps
   zeroed;
3. one matrix multiply with the weight reordered to (kh·kw·C, C_out), run as a oneDNN 1×1 convolution on a
   channels-last view (shared/FEASIBILITY.md: ~2.4× faster than the MKL ``matmul`` on these CPUs);
4. the (N, C_out) result rows are scattered (``index_copy``) into the output, or returned as rows so that the
   caller can fuse the next step (a residual add, a second convolution reading from a padded buffer).

Every function works at any batch size with a different mask per sample; the results equal the dense
convolution at the active positions (exactly, up to float summation order; tested in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActivePositions", "SparseConv2d", "conv_rows", "dilate_mask", "gather_patches", "nhwc",
           "sparse_conv2d", "weight_matrix"]


@dataclass(frozen=True)
class ActivePositions:
    """The active positions of a (B, H, W) mask, computed once and reused by every kernel that needs them.

    Attributes:
        batch: (N,) sample index of each active position.
        row: (N,) row index. col: (N,) column index.
        flat: (N,) index into a (B·H·W, C) row matrix of the mask's grid (where results are scattered).
        shape: (B, H, W) of the mask grid.
    """

    batch: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    flat: torch.Tensor
    shape: tuple[int, int, int]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> ActivePositions:
        """From a (B, H, W) bool mask (one ``nonzero``)."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a (B, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        b, h, w = mask.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # (N,) in (b, i, j) row-major order
        col = flat % w
        row = (flat // w) % h
        batch = flat // (h * w)
        return cls(batch=batch, row=row, col=col, flat=flat, shape=(b, h, w))

    @property
    def count(self) -> int:
        return int(self.flat.numel())

    def per_sample(self) -> torch.Tensor:
        """(B,) number of active positions of each sample (int64)."""
        return torch.bincount(self.batch, minlength=self.shape[0])


def dilate_mask(mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """(B, H, W) bool: positions within the kernel_size×kernel_size neighbourhood of an active position — what a
    convolution must produce for a following kernel_size×kernel_size convolution to be exact on ``mask``."""
    if kernel_size == 1:
        return mask
    m = F.max_pool2d(mask[:, None].to(torch.float32), kernel_size, stride=1, padding=kernel_size // 2)
    return m[:, 0] > 0


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → contiguous (B, H, W, C): a free view for a channels-last tensor, one copy otherwise."""
    return x.permute(0, 2, 3, 1).contiguous()


def _gather_taps(x_nhwc: torch.Tensor, batch: torch.Tensor, row: torch.Tensor, col: torch.Tensor, *,
                 kernel_size: tuple[int, int], stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Per-tap gather (one pixel row of C values per tap), taps outside the image zeroed: (N, kh·kw·C)."""
    b, h, w, c = x_nhwc.shape
    kh, kw = kernel_size
    dev = x_nhwc.device
    r = (row * stride - padding)[:, None] + torch.arange(kh, device=dev)[None, :] * dilation  # (N, kh)
    q = (col * stride - padding)[:, None] + torch.arange(kw, device=dev)[None, :] * dilation  # (N, kw)
    base = batch * (h * w)
    index = (base[:, None, None] + r.clamp(0, h - 1)[:, :, None] * w + q.clamp(0, w - 1)[:, None, :]).reshape(-1)
    patches = x_nhwc.reshape(b * h * w, c).index_select(0, index)  # (N·kh·kw, C): one gather
    if padding > 0:
        outside = ((r < 0) | (r >= h))[:, :, None] | ((q < 0) | (q >= w))[:, None, :]  # (N, kh, kw)
        bad = outside.reshape(-1).nonzero().squeeze(1)  # only the border taps
        if bad.numel():
            patches.index_fill_(0, bad, 0.0)
    return patches.view(-1, kh * kw * c)


# Pad the input once instead of re-gathering the border windows tap by tap when the border windows' taps, times
# this factor, reach the input's pixel count. Per-stage timings on the kernel bench's shape (64 channels, 8×56×56,
# 25 % density; ad hoc, indicative only): padding ~0.15 ms, the tap-by-tap border path ~0.6 ms; at a few per cent
# density the border path is cheaper. End to end the two paths measured the same within noise.
_PAD_FACTOR = 8


def gather_patches(x_nhwc: torch.Tensor, pos: ActivePositions, *, kernel_size: tuple[int, int] = (3, 3),
                   stride: int = 1, padding: int = 1, dilation: int = 1) -> torch.Tensor:
    """The im2col rows of the active output positions, gathered straight from an NHWC input.

    With ``dilation == 1`` (the usual case) the kw neighbouring pixels of one kernel row are adjacent in NHWC
    memory, so each active position gathers ``kh`` *runs* of ``kw·C`` contiguous values through an overlapping
    strided view: one ``index_select`` of ``N·kh`` rows, a third of the indices and three times longer copies
    than a per-pixel gather. Windows that cross the border (a thin frame of the image) need the zero padding.
    When few do (low density), the padding is never materialised: they gather a clamped run and are then
    re-gathered tap by tap, with the taps outside the image zeroed, and written over their rows; the cost is
    then proportional to the active positions only. When many do, one zero-padded copy of the input is made
    and every window is a plain run (``_PAD_FACTOR``). With dilation every position is gathered tap by tap.

    Only the rows of taps that are read need to hold valid values (the residual blocks gather from a buffer
    written at the dilated mask only).

    Args:
        x_nhwc: (B, H, W, C) contiguous input.
        pos: active positions of the *output* grid.
        kernel_size: (kh, kw). stride, padding, dilation: as ``conv2d``.

    Returns:
        (N, kh·kw·C) patches, taps in (di, dj, c) order (see :func:`weight_matrix`).
    """
    b, h, w, c = x_nhwc.shape
    kh, kw = kernel_size
    opts = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    if dilation != 1 or kw > w:
        return _gather_taps(x_nhwc, pos.batch, pos.row, pos.col, **opts)
    dev = x_nhwc.device
    r0 = pos.row * stride - padding  # (N,) first input row / column of each window
    q0 = pos.col * stride - padding
    border = None
    if padding > 0:
        border = ((r0 < 0) | (r0 + kh > h) | (q0 < 0) | (q0 + kw > w)).nonzero().squeeze(1)
        if border.numel() * kh * kw * _PAD_FACTOR >= b * h * w:
            # Many windows cross the border: one zero-padded copy of the input (a cost in proportion to the
            # input, ~a sixth of the gather at 25 % density) is cheaper than re-gathering them tap by tap.
            x_nhwc = F.pad(x_nhwc, (0, 0, padding, padding, padding, padding))
            h, w = h + 2 * padding, w + 2 * padding
            r0, q0, border = r0 + padding, q0 + padding, None
    r = r0[:, None] + torch.arange(kh, device=dev)[None, :]  # (N, kh)
    start = (pos.batch * (h * w))[:, None] + r.clamp(0, h - 1) * w + q0.clamp(0, w - kw)[:, None]
    runs = x_nhwc.reshape(-1).as_strided((b * h * w - (kw - 1), kw * c), (c, 1))  # row k: pixels k .. k+kw-1
    patches = runs.index_select(0, start.reshape(-1)).view(pos.count, kh * kw * c)
    if border is not None and border.numel():
        patches.index_copy_(0, border, _gather_taps(x_nhwc, pos.batch[border], pos.row[border],
                                                    pos.col[border], **opts))
    return patches


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, kh, kw) convolution weight → (C_out, kh·kw·C_in, 1, 1), taps in (di, dj, c) order, ready for
    :func:`conv_rows`."""
    co = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(co, -1, 1, 1).contiguous()


def conv_rows(patches: torch.Tensor, wmat: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) patches × (C_out, K, 1, 1) weight (+ bias) → (N, C_out), as a oneDNN 1×1 convolution.

    The rows are presented as a 1×N×1 channels-last image (a free view), which oneDNN multiplies much faster than
    MKL's ``matmul`` on these CPUs (shared/FEASIBILITY.md). Autograd flows through it as through ``conv2d``.
    """
    n, k = patches.shape
    if n == 0:
        return patches.new_zeros(0, wmat.shape[0])
    img = patches.view(1, n, 1, k).permute(0, 3, 1, 2)  # (1, K, N, 1) with channels-last strides
    out = F.conv2d(img, wmat, bias)  # (1, C_out, N, 1), channels-last
    return out.permute(0, 2, 3, 1).reshape(n, -1)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor, *,
                  stride: int = 1, padding: int = 0, dilation: int = 1, fill: torch.Tensor | float = 0.0
                  ) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation)`` computed only where ``mask`` is on.

    Args:
        x: (B, C_in, H, W) input (channels-last avoids a copy).
        weight: (C_out, C_in, kh, kw) (groups = 1).
        bias: (C_out,) or None.
        mask: (B, H_out, W_out) bool, the output positions to compute (different per sample).
        stride, padding, dilation: as ``conv2d`` (square).
        fill: value of the inactive positions (a number, or a (B, C_out, H_out, W_out) tensor to write into).

    Returns:
        (B, C_out, H_out, W_out) in channels-last memory format; equal to the dense convolution where ``mask`` is
        on, to ``fill`` elsewhere.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"expected x (B, C, H, W) and weight (C_out, C, kh, kw), got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    kh, kw = weight.shape[2:]
    ho = _out_size(x.shape[2], kh, stride, padding, dilation)
    wo = _out_size(x.shape[3], kw, stride, padding, dilation)
    if tuple(mask.shape) != (x.shape[0], ho, wo):
        raise ValueError(f"mask must have the output shape {(x.shape[0], ho, wo)}, got {tuple(mask.shape)}")
    pos = ActivePositions.from_mask(mask)
    co = weight.shape[0]
    if isinstance(fill, torch.Tensor):
        out = fill.permute(0, 2, 3, 1).reshape(-1, co).clone()
    else:
        out = x.new_full((x.shape[0] * ho * wo, co), float(fill))
    if pos.count:
        patches = gather_patches(nhwc(x), pos, kernel_size=(kh, kw), stride=stride, padding=padding,
                                 dilation=dilation)
        out.index_copy_(0, pos.flat, conv_rows(patches, weight_matrix(weight), bias))
    return out.view(x.shape[0], ho, wo, co).permute(0, 3, 1, 2)


class SparseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (square kernel, groups = 1, zero padding) whose forward takes an optional output mask.

    ``forward(x)`` is the dense convolution; ``forward(x, mask)`` computes only the masked output positions
    (zeros elsewhere) with :func:`sparse_conv2d`. FLOPs are those of the dense convolution (the static count);
    the ledger of a dynamic model charges ``flops_per_position × active positions``.
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("SparseConv2d supports groups=1, numeric zero padding only")
        if len(set(self.kernel_size)) != 1 or len(set(self.stride)) != 1 or len(set(self.padding)) != 1 \
                or len(set(self.dilation)) != 1:
            raise ValueError("SparseConv2d supports square kernels, strides, paddings and dilations only")

    @property
    def flops_per_position(self) -> int:
        """Multiply-accumulates per output position."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1] * self.out_channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if mask is None:
            return super().forward(x)
        return sparse_conv2d(x, self.weight, self.bias, mask, stride=self.stride[0], padding=int(self.padding[0]),
                             dilation=self.dilation[0])
