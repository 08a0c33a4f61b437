"""Deformable convolution v1/v2 (our own op) and a ResNet of "dynamic residual blocks" built on it.

Papers: J. Dai, H. Qi, Y. Xiong, Y. Li, G. Zhang, H. Hu, Y. Wei, "Deformable Convolutional Networks", ICCV 2017,
arXiv:1703.06211 (v1: learned offsets); X. Zhu, H. Hu, S. Lin, J. Dai, "Deformable ConvNets v2: More Deformable,
Better Results", CVPR 2019, arXiv:1811.11168 (v2: plus a modulation scalar per sampling point).

For an output position p and kernel point k the input is sampled at ``p·s − pad + k·d + Δp_k(p)`` by bilinear
interpolation (zero outside the image), multiplied by the modulation ``m_k(p) ∈ (0, 1)`` (v2), and the samples are
combined with the convolution weight: ``y(p) = Σ_k w_k · m_k(p) · x(p_k + Δp_k(p))``. The offsets Δp and the
modulation logits are predicted from the same input by a 3×3 convolution (zero-initialised, as in both papers, so
training starts from the regular grid with m = 0.5 in v2).

:func:`deform_conv2d` is written with plain tensor operations — the four bilinear corners are gathered with
``torch.gather`` from a (B, G, C/G, H·W) view and weighted — so autograd gives exact gradients for the input,
the offsets, the modulation and the weight; ``tests/spatial_wise/deformable`` gradient-checks it in float64 and
compares it with an independent reference written from the papers' formula
``x(p) = Σ_q max(0, 1 − |q_y − p_y|)·max(0, 1 − |q_x − p_x|)·x(q)``.

FLOPs per output position (the library's MAC convention): the offset/modulation conv
``C_in·9·(3 if v2 else 2)·G·K``, the bilinear sampling ``4·C_in·K`` (four multiply-adds per sampled value), the
modulation ``C_in·K`` (v2) and the convolution itself ``C_in·K·C_out``.

The network (:class:`DeformResNet`) replaces the second 3×3 convolution of the blocks of the chosen stages by a
deformable one (v2 deforms the later stages). It has no discrete decision: train, simulate and execute compute the
same thing, and every sample pays the same cost. ``all_on()`` is the neutral value of the dynamic part — the
regular sampling grid (no offsets, no modulation, offset convs not run) — which is exactly the static twin.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.registry import register_model
from dynaneural.spatial_wise.pixel._resnet import BasicBlock, ResNetCifar
from dynaneural.validation import check_batch

__all__ = ["DeformConv2d", "DeformResNet", "DeformResNetConfig", "deform_conv2d", "deform_flops_per_position"]


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, *, stride: int = 1, padding: int = 0, dilation: int = 1
                  ) -> torch.Tensor:
    """Deformable convolution (v1 without ``mask``, v2 with it).

    Args:
        x: (B, C, H, W) input.
        offset: (B, 2·G·K, H_out, W_out) offsets, (Δy, Δx) per kernel point k (row-major over the kernel) and
            offset group g, in the order ``[g][k][y, x]`` (torchvision's layout). G divides C.
        weight: (C_out, C, kh, kw). bias: (C_out,) or None.
        mask: (B, G·K, H_out, W_out) modulation scalars (v2), or None.
        stride, padding, dilation: as ``conv2d``.

    Returns:
        (B, C_out, H_out, W_out).
    """
    b, c, h, w = x.shape
    co, ci, kh, kw = weight.shape
    if ci != c:
        raise ValueError(f"weight expects {ci} input channels, x has {c}")
    k = kh * kw
    ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
    if offset.dim() != 4 or offset.shape[0] != b or offset.shape[2:] != (ho, wo) or offset.shape[1] % (2 * k):
        raise ValueError(f"offset must have shape (B, 2·G·{k}, {ho}, {wo}), got {tuple(offset.shape)}")
    g = offset.shape[1] // (2 * k)
    if c % g:
        raise ValueError(f"offset groups {g} must divide the input channels {c}")
    if mask is not None and tuple(mask.shape) != (b, g * k, ho, wo):
        raise ValueError(f"mask must have shape {(b, g * k, ho, wo)}, got {tuple(mask.shape)}")
    dev, dt = x.device, x.dtype
    # regular sampling grid (K, H_out, W_out)
    ky = (torch.arange(kh, device=dev, dtype=dt) * dilation).repeat_interleave(kw)
    kx = (torch.arange(kw, device=dev, dtype=dt) * dilation).repeat(kh)
    gy = (torch.arange(ho, device=dev, dtype=dt) * stride - padding)[None, :, None] + ky[:, None, None]
    gx = (torch.arange(wo, device=dev, dtype=dt) * stride - padding)[None, None, :] + kx[:, None, None]
    off = offset.view(b, g, k, 2, ho, wo)
    py = gy + off[:, :, :, 0]  # (B, G, K, H_out, W_out) sampling rows
    px = gx + off[:, :, :, 1]
    y0, x0 = py.floor(), px.floor()
    ly, lx = py - y0, px - x0
    y0l, x0l = y0.long(), x0.long()
    xs = x.view(b, g, c // g, h * w)
    length = k * ho * wo
    sampled = x.new_zeros(b, g, c // g, length)
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0l + dy, x0l + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).view(b, g, 1, length).expand(b, g, c // g, length)
        corner_w = (wgt * inside).view(b, g, 1, length)
        sampled = sampled + xs.gather(3, index) * corner_w
    if mask is not None:
        sampled = sampled * mask.view(b, g, 1, length)
    cols = sampled.view(b, c, k, ho * wo).reshape(b, c * k, ho * wo)  # (c, k) order = weight's (C, kh, kw)
    out = torch.matmul(weight.reshape(co, c * k), cols)  # (B, C_out, L)
    if bias is not None:
        out = out + bias.view(1, co, 1)
    return out.view(b, co, ho, wo)


def deform_flops_per_position(in_chans: int, out_chans: int, kernel: int, *, offset_groups: int = 1,
                              modulated: bool = True, offset_kernel: int = 3) -> tuple[int, int]:
    """(FLOPs of the deformable machinery, FLOPs of the convolution itself) per output position."""
    k = kernel * kernel
    offset_out = (3 if modulated else 2) * offset_groups * k
    extra = in_chans * offset_kernel ** 2 * offset_out + 4 * in_chans * k + (in_chans * k if modulated else 0)
    return extra, in_chans * k * out_chans


class DeformConv2d(nn.Conv2d):
    """A deformable convolution layer (an ``nn.Conv2d`` whose sampling grid moves): v2 when ``modulated``.

    ``forward(x)`` predicts offsets (and modulation) from ``x`` with a zero-initialised 3×3 convolution and runs
    :func:`deform_conv2d`; ``forward(x, deform=False)`` is the plain convolution on the regular grid. The weight
    is the ``nn.Conv2d`` weight, so the static twin is this layer as an ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int = 1, dilation: int = 1, bias: bool = False, offset_groups: int = 1,
                 modulated: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         bias=bias)
        self.offset_groups, self.modulated = offset_groups, modulated
        k = kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(in_channels, (3 if modulated else 2) * offset_groups * k, 3, stride=stride,
                                     padding=1)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def offsets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(offset (B, 2·G·K, H_out, W_out), modulation (B, G·K, H_out, W_out) or None) predicted from ``x``."""
        o = self.offset_conv(x)
        n = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        return o[:, :n], (torch.sigmoid(o[:, n:]) if self.modulated else None)

    def forward(self, x: torch.Tensor, deform: bool = True) -> torch.Tensor:  # type: ignore[override]
        if not deform:
            return super().forward(x)
        offset, mask = self.offsets(x)
        return self.deform(x, offset, mask)

    def deform(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, mask, stride=self.stride[0],
                             padding=int(self.padding[0]), dilation=self.dilation[0])

    def flops_per_position(self) -> tuple[int, int]:
        return deform_flops_per_position(self.in_channels, self.out_channels, self.kernel_size[0],
                                         offset_groups=self.offset_groups, modulated=self.modulated)

    def flops(self, inputs: tuple, output: torch.Tensor) -> float:
        """Whole-batch FLOPs for :func:`~dynaneural.compute.flops.count_flops` (deformed forward)."""
        extra, conv = self.flops_per_position()
        return float((extra + conv) * output.shape[0] * output.shape[2] * output.shape[3])


@dataclass(frozen=True)
class DeformResNetConfig:
    """Args:
    in_chans, input_size, num_classes, widths, depths, strides: the ResNet (``pixel._resnet.ResNetCifar``).
    deform_stages: indices of the stages whose blocks get a deformable second convolution.
    modulated: v2 (modulation) or v1. offset_groups: offset groups G. offset_init_std: std of the offset conv's
    initial weights (0 = the papers' zero init; the tiny test variant uses > 0 so samples differ at init).
    """

    in_chans: int = 3
    input_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (3, 3, 3)
    strides: tuple[int, ...] = (1, 2, 2)
    deform_stages: tuple[int, ...] = (1, 2)
    modulated: bool = True
    offset_groups: int = 1
    offset_init_std: float = 0.0


class DeformResNet(AllOnFlag, DynamicModel):
    """A CIFAR ResNet whose chosen blocks are dynamic residual blocks (a deformable second convolution)."""

    def __init__(self, cfg: DeformResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.net = ResNetCifar(in_chans=cfg.in_chans, num_classes=cfg.num_classes, widths=cfg.widths,
                               depths=cfg.depths, strides=cfg.strides)
        stage_of = [s for s, d in enumerate(cfg.depths) for _ in range(d)]
        size, w0 = cfg.input_size, cfg.widths[0]
        self.fixed_flops = float((cfg.in_chans * 9 * w0 + 2 * w0) * size * size)
        self.deform_extra = 0.0
        for i, blk in enumerate(self.net.blocks):
            size //= blk.stride
            self.fixed_flops += blk.dense_cost(size, size)
            if stage_of[i] in cfg.deform_stages:
                c = blk.conv2.out_channels
                dc = DeformConv2d(c, c, 3, padding=1, offset_groups=cfg.offset_groups, modulated=cfg.modulated)
                dc.weight.data.copy_(blk.conv2.weight.data)
                if cfg.offset_init_std:
                    nn.init.normal_(dc.offset_conv.weight, std=cfg.offset_init_std)
                blk.conv2 = dc
                self.deform_extra += dc.flops_per_position()[0] * size * size
        self.fixed_flops += cfg.widths[-1] * size * size + cfg.widths[-1] * cfg.num_classes
        self._all_on = False

    # all_on() comes from AllOnFlag: The regular sampling grid everywhere (offset convs not run): the static twin.

    def to_static(self) -> nn.Module:
        static = copy.deepcopy(self.net)
        for blk in static.blocks:
            if isinstance(blk.conv2, DeformConv2d):
                plain = nn.Conv2d(blk.conv2.in_channels, blk.conv2.out_channels, 3, padding=1, bias=False)
                plain.weight.data.copy_(blk.conv2.weight.data)
                blk.conv2 = plain
        return static

    def _block(self, blk: BasicBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = F.relu(blk.bn1(blk.conv1(x)))
        if isinstance(blk.conv2, DeformConv2d) and not self._all_on:
            offset, mask = blk.conv2.offsets(h)
            r = blk.bn2(blk.conv2.deform(h, offset, mask))
            return F.relu(blk.shortcut(x) + r), offset.abs().flatten(1).mean(1)
        conv2 = blk.conv2.forward(h, deform=False) if isinstance(blk.conv2, DeformConv2d) else blk.conv2(h)
        return F.relu(blk.shortcut(x) + blk.bn2(conv2)), None

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.fixed_flops + (0.0 if self._all_on else self.deform_extra))
        h = self.net.stem(x)
        magnitudes = []
        for blk in self.net.blocks:
            h, mag = self._block(blk, h)
            if mag is not None:
                magnitudes.append(mag)
        logits = self.net.head(h)
        mean_offset = (torch.stack(magnitudes, 1).mean(1).double() if magnitudes
                       else torch.zeros(b, dtype=torch.float64, device=x.device))
        return DynamicOutput(logits=logits, cost=ledger.flops, decisions={"mean_abs_offset": mean_offset}, mode=mode)


@register_model
def deform_resnet20_cifar(*, num_classes: int = 10, modulated: bool = True,
                          deform_stages: tuple[int, ...] = (1, 2)) -> DeformResNet:
    """ResNet-20 on 3×32×32 with deformable (v2 by default) second convolutions in stages 2 and 3."""
    return DeformResNet(DeformResNetConfig(num_classes=num_classes, modulated=modulated,
                                           deform_stages=tuple(deform_stages)))


@register_model
def test_deform_resnet(*, num_classes: int = 10, modulated: bool = True) -> DeformResNet:
    """Tiny variant for tests: 3×8×8, 2 stages (8, 16 channels), randomly initialised offsets."""
    return DeformResNet(DeformResNetConfig(in_chans=3, input_size=8, num_classes=num_classes, widths=(8, 16),
                                           depths=(1, 1), strides=(1, 2), deform_stages=(0, 1), modulated=modulated,
                                           offset_init_std=0.05))
