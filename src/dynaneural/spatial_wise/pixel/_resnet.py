"""The small CIFAR ResNet the pixel-level methods gate, and its masked residual-block execution.

The network is the CIFAR ResNet of K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, arXiv:1512.03385 (3×3 stem, three stages of basic blocks, global pooling, linear head),
with 1×1 projection shortcuts where the shape changes. It is kept here, private to ``spatial_wise.pixel``, because
DynConv, SBNet and SACT all need the same two things from it: the static twin (``ResNetCifar``) and a basic
block that can run its residual branch only at a mask of output positions (:meth:`BasicBlock.masked_execute`).

Masked execution of a basic block ``y = relu(shortcut(x) + m ⊙ F(x))`` with ``F = bn2∘conv2∘relu∘bn1∘conv1``:

* ``conv2`` runs at the active positions ``m`` only, so ``conv1`` must run at ``dilate(m)`` (the 3×3
  neighbourhoods of the active positions) and nowhere else; its output is scattered into a zero-padded NHWC
  buffer that ``conv2`` gathers from (DynConv's "mask dilation");
* batch norm is folded into the convolutions (inference statistics), so each step is gather → one matrix
  multiply → scatter;
* inactive positions take ``relu(shortcut(x))``, which for an identity shortcut is ``x`` itself (every block's
  input is a ReLU output), so an identity block copies nothing it does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.spatial_wise.pixel.sparse_conv import (
    ActivePositions,
    conv_rows,
    dilate_mask,
    gather_patches,
    nhwc,
    weight_matrix,
)

__all__ = ["BasicBlock", "ResNetCifar", "fold_conv_bn"]


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` at inference as one convolution (``conv`` has no bias)."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class BasicBlock(nn.Module):
    """conv3×3(stride)-BN-ReLU-conv3×3-BN plus a shortcut (identity, or 1×1 conv-BN when the shape changes),
    then ReLU.

    Attributes:
        conv1_fpp, conv2_fpp, shortcut_fpp: FLOPs per output position of each part (convolution MACs plus 2 per
            batch-norm output element, the library's convention), so a ledger charges ``fpp × positions``.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_chans))
        self.conv1_fpp = in_chans * 9 * out_chans + 2 * out_chans
        self.conv2_fpp = out_chans * 9 * out_chans + 2 * out_chans
        self.shortcut_fpp = 0 if isinstance(self.shortcut, nn.Identity) else in_chans * out_chans + 2 * out_chans

    @property
    def identity_shortcut(self) -> bool:
        return isinstance(self.shortcut, nn.Identity)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch F(x), dense: (B, C_in, H, W) → (B, C_out, H/s, W/s)."""
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.residual(x))

    def masked_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reference (simulate/train) semantics: everything computed, ``relu(shortcut(x) + mask ⊙ F(x))``.

        ``mask``: (B, H_out, W_out), bool or a relaxed float in [0, 1] (train mode, straight-through).
        """
        return F.relu(self.shortcut(x) + self.residual(x) * mask[:, None].to(x.dtype))

    def masked_execute(self, x: torch.Tensor, mask: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Execute semantics: the residual branch only at the active positions of ``mask`` (B, H_out, W_out) bool.

        With ``inplace`` (and autograd off) an identity block writes its active rows into ``x`` itself instead of
        copying the whole map first: the networks pass it for the feature maps they own.

        Returns the block output (B, C_out, H_out, W_out) in channels-last format; equal to
        :meth:`masked_dense` (inference statistics) up to float summation order.
        """
        sc = self.shortcut(x)
        base = sc if self.identity_shortcut else F.relu(sc)  # block inputs are ReLU outputs: relu(x) = x
        pos = ActivePositions.from_mask(mask)
        if pos.count == 0:
            return base
        b, co, ho, wo = base.shape
        # conv1 (+bn1, relu) at dilate(mask), scattered into a zero-padded NHWC buffer for conv2 to gather from
        pos1 = ActivePositions.from_mask(dilate_mask(mask, 3))
        w1, b1 = fold_conv_bn(self.conv1, self.bn1)
        rows1 = F.relu(conv_rows(gather_patches(nhwc(x), pos1, stride=self.stride), weight_matrix(w1), b1))
        # conv2 reads only rows of dilate(mask) (and zeroed taps outside the image): the rest stays unwritten
        hidden = x.new_empty(b * ho * wo, co)  # (B·H·W, C) NHWC rows
        hidden.index_copy_(0, pos1.flat, rows1)
        # conv2 (+bn2) at mask, residual add and ReLU on the active rows only
        w2, b2 = fold_conv_bn(self.conv2, self.bn2)
        rows2 = conv_rows(gather_patches(hidden.view(b, ho, wo, co), pos), weight_matrix(w2), b2)
        sc_flat = nhwc(sc).view(b * ho * wo, co)
        sc_rows = sc_flat.index_select(0, pos.flat)  # the shortcut before the ReLU
        out = nhwc(base).view(b * ho * wo, co)
        if not inplace or torch.is_grad_enabled():
            out = out.clone()  # keep the caller's input (and autograd's saved tensors) intact
        out.index_copy_(0, pos.flat, F.relu(sc_rows + rows2))
        return out.view(b, ho, wo, co).permute(0, 3, 1, 2)

    def position_costs(self, mask: torch.Tensor) -> torch.Tensor:
        """(B,) float64 FLOPs this block spends per sample when its residual runs at ``mask`` (bool)."""
        n2 = mask.flatten(1).sum(1, dtype=torch.float64)
        n1 = dilate_mask(mask, 3).flatten(1).sum(1, dtype=torch.float64)
        return self.conv1_fpp * n1 + self.conv2_fpp * n2 + self.shortcut_fpp * float(mask[0].numel())

    def expected_position_costs(self, mask: torch.Tensor) -> torch.Tensor:
        """(B,) differentiable cost of a relaxed mask (B, H, W) in [0, 1]: dilation by max-pooling (DynConv)."""
        dil = F.max_pool2d(mask[:, None], 3, stride=1, padding=1)[:, 0]
        return (self.conv1_fpp * dil.flatten(1).sum(1) + self.conv2_fpp * mask.flatten(1).sum(1)
                + self.shortcut_fpp * float(mask[0].numel()))

    def dense_cost(self, h_out: int, w_out: int) -> float:
        return float((self.conv1_fpp + self.conv2_fpp + self.shortcut_fpp) * h_out * w_out)


class ResNetCifar(nn.Module):
    """The static network: stem conv3×3-BN-ReLU, stages of :class:`BasicBlock`, global average pool, linear.

    Args:
        in_chans: input channels. num_classes: classes. widths: channels per stage. depths: blocks per stage.
        strides: stride of each stage's first block.
    """

    def __init__(self, *, in_chans: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 depths: tuple[int, ...] = (3, 3, 3), strides: tuple[int, ...] = (1, 2, 2)) -> None:
        super().__init__()
        if not (len(widths) == len(depths) == len(strides)) or min(depths) < 1:
            raise ValueError(f"widths {widths}, depths {depths}, strides {strides}: same lengths, depths >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks: list[BasicBlock] = []
        prev = widths[0]
        for w, d, s in zip(widths, depths, strides, strict=True):
            for i in range(d):
                blocks.append(BasicBlock(prev, w, s if i == 0 else 1))
                prev = w
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)
