"""SBNet: block-sparse convolution over active tiles.

Paper: M. Ren, A. Pokrovsky, B. Yang, R. Urtasun, "SBNet: Sparse Blocks Network for Fast Inference", CVPR 2018,
arXiv:1801.02108.

A tile mask (one bit per ``block × block`` tile of the output) selects where to compute. SBNet's three steps:

1. *reduce mask* — the mask lives on the tile grid (here a learned gate on the average-pooled input of each
   tile);
2. *sparse gather* — every active tile is copied, with the halo its convolutions need, into a batch of small
   dense patches (T, C, block + 2·halo, block + 2·halo); here with index arithmetic on NHWC feature maps and
   one ``index_select``, zero outside the image;
3. dense convolution of the patch batch ("valid" padding), then *sparse scatter* of the tile interiors back into
   the output.

:func:`block_sparse_conv2d` is the kernel for one convolution. :class:`SBNetResNet` gates the stride-1 residual
blocks of a CIFAR ResNet per tile and runs each active tile's whole residual branch — conv3×3, BN, ReLU,
conv3×3, BN — on a patch with a halo of 2, as the paper's ResNet blocks do. The halo is recomputed per tile
(that is what runs, and what the ledger charges: ``(block + 2)²`` positions of the first convolution per tile).
Down-sampling blocks run dense. Training uses the same straight-through Gumbel gates and budget loss as DynConv.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.execution import Mode, run_rows
from dynaneural.policies import binary_decision
from dynaneural.registry import register_model
from dynaneural.spatial_wise.pixel._resnet import BasicBlock, fold_conv_bn
from dynaneural.spatial_wise.pixel.dynconv import DynConvConfig, DynConvResNet
from dynaneural.spatial_wise.pixel.sparse_conv import ActivePositions, nhwc

__all__ = ["SBNetResNet", "block_sparse_conv2d", "gather_tiles", "scatter_tiles", "tile_mask_to_pixels"]


def tile_mask_to_pixels(tile_mask: torch.Tensor, block: int, height: int, width: int) -> torch.Tensor:
    """(B, Th, Tw) tile mask → (B, H, W) pixel mask (nearest upsampling, cropped to the image)."""
    m = tile_mask.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return m[:, :height, :width]


@functools.lru_cache(maxsize=128)
def _patch_table(height: int, width: int, block: int, halo: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per tile of the grid, the pixel offsets of its patch inside one sample, computed once per map shape.

    Returns ``(offset, outside, inside)``: ``offset`` (Th·Tw, S·S) int64, the row index ``r·W + q`` of every
    patch pixel at clamped coordinates; ``outside`` (Th·Tw, S·S) bool, the patch pixels outside the image (None
    when no tile has any); ``inside`` (Th·Tw, 1, S, S) float, its complement. S = block + 2·halo.
    A call then needs one lookup per tile instead of rebuilding every coordinate (a dozen small tensor ops, a
    measurable part of a kernel that runs in a few milliseconds).
    """
    th, tw = -(-height // block), -(-width // block)
    grid = torch.arange(th * tw, device=device)
    size = block + 2 * halo
    ar = torch.arange(size, device=device)
    r = ((grid // tw) * block - halo)[:, None] + ar  # (Th·Tw, S)
    q = ((grid % tw) * block - halo)[:, None] + ar
    offset = (r.clamp(0, height - 1)[:, :, None] * width + q.clamp(0, width - 1)[:, None, :]).reshape(th * tw, -1)
    out_r, out_q = (r < 0) | (r >= height), (q < 0) | (q >= width)
    outside = (out_r[:, :, None] | out_q[:, None, :]).reshape(th * tw, -1)
    inside = (~outside).view(th * tw, 1, size, size).float()
    return offset, (outside if bool(outside.any()) else None), inside


def _tile_slots(tiles: ActivePositions) -> torch.Tensor:
    """(T,) index of every active tile in its sample's tile grid (row-major)."""
    _, th, tw = tiles.shape
    return tiles.flat % (th * tw)


def gather_tiles(x_nhwc: torch.Tensor, tiles: ActivePositions, *, block: int, halo: int) -> torch.Tensor:
    """SBNet's sparse gather: active tiles with their halo as a batch of patches.

    One ``index_select`` of the T·S·S pixel rows (C contiguous values each) at clamped coordinates, then the rows
    that fall outside the image (the halo at the border, a ragged last tile) are zeroed in place. The input is
    never padded: a zero-padded copy costs a fill and a copy of the *whole* feature map (~0.35 ms of 3.5 ms for
    the kernel bench's 64 × 8 × 56 × 56 map at 25 % of the tiles), whereas this costs in proportion to the active
    tiles only. The patch coordinates come from a per-shape table (:func:`_patch_table`).

    Args:
        x_nhwc: (B, H, W, C) contiguous feature map.
        tiles: active positions of the tile grid (B, Th, Tw).
        block: tile size. halo: extra pixels on each side.

    Returns:
        (T, C, S, S) channels-last patches, S = block + 2·halo; zero outside the image.
    """
    b, h, w, c = x_nhwc.shape
    size = block + 2 * halo
    offset, outside, _ = _patch_table(h, w, block, halo, x_nhwc.device)
    slots = _tile_slots(tiles)
    index = (tiles.batch * (h * w))[:, None] + offset.index_select(0, slots)  # (T, S·S)
    patches = x_nhwc.reshape(b * h * w, c).index_select(0, index.reshape(-1))  # (T·S·S, C)
    if outside is not None:
        bad = outside.index_select(0, slots).reshape(-1).nonzero().squeeze(1)
        if bad.numel():
            patches.index_fill_(0, bad, 0.0)
    return patches.view(tiles.count, size, size, c).permute(0, 3, 1, 2)


def _inside(tiles: ActivePositions, *, block: int, halo: int, height: int, width: int) -> torch.Tensor:
    """(T, 1, S, S) float: 1 where a patch pixel lies inside the image."""
    return _patch_table(height, width, block, halo, tiles.flat.device)[2].index_select(0, _tile_slots(tiles))


def scatter_tiles(out_rows: torch.Tensor, tiles: ActivePositions, values: torch.Tensor, *, block: int,
                  height: int, width: int) -> torch.Tensor:
    """SBNet's sparse scatter: write tile interiors (T, C, block, block) into ``out_rows`` (B·H·W, C) in place
    (pixels of a ragged last tile that fall outside the image are dropped)."""
    offset, outside, _ = _patch_table(height, width, block, 0, tiles.flat.device)
    slots = _tile_slots(tiles)
    index = ((tiles.batch * (height * width))[:, None] + offset.index_select(0, slots)).reshape(-1)
    rows = values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
    if outside is not None:  # a ragged last tile: its clamped pixels would overwrite the border ones
        ok = ~outside.index_select(0, slots).reshape(-1)
        return out_rows.index_copy_(0, index[ok], rows[ok])
    return out_rows.index_copy_(0, index, rows)


def block_sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile_mask: torch.Tensor,
                        *, block: int) -> torch.Tensor:
    """A stride-1 "same" convolution (odd kernel, zero padding k // 2) computed on the active tiles only.

    Args:
        x: (B, C_in, H, W). weight: (C_out, C_in, k, k). bias: (C_out,) or None.
        tile_mask: (B, ceil(H / block), ceil(W / block)) bool.
        block: tile size.

    Returns:
        (B, C_out, H, W) channels-last: the dense convolution on active tiles, zero elsewhere.
    """
    k = weight.shape[-1]
    if k % 2 == 0 or weight.shape[-2] != k:
        raise ValueError(f"block_sparse_conv2d needs a square odd kernel, got {tuple(weight.shape[-2:])}")
    b, _, h, w = x.shape
    grid = (b, -(-h // block), -(-w // block))
    if tuple(tile_mask.shape) != grid:
        raise ValueError(f"tile_mask must have shape {grid}, got {tuple(tile_mask.shape)}")
    tiles = ActivePositions.from_mask(tile_mask)
    co = weight.shape[0]
    out = x.new_zeros(b * h * w, co)
    if tiles.count:
        patches = gather_tiles(nhwc(x), tiles, block=block, halo=k // 2)
        scatter_tiles(out, tiles, F.conv2d(patches, weight, bias), block=block, height=h, width=w)
    return out.view(b, h, w, co).permute(0, 3, 1, 2)


class SBNetResNet(DynConvResNet):
    """A CIFAR ResNet whose stride-1 residual blocks run only on the tiles their gate selects (SBNet execution).

    ``cfg.gate_strided`` is ignored: down-sampling blocks run dense. ``block`` is the tile size in output pixels,
    one for every stage or one per stage; a stage whose map is no larger than its tile has one tile per sample,
    which runs as a whole map (the sample's rows of the batch as a sub-batch, zero padding at the image border: no
    halo to recompute). Every other gated block's map must be divisible by its tile.
    """

    def __init__(self, cfg: DynConvConfig, *, block: int | Sequence[int] = 4) -> None:
        blocks = (int(block),) * len(cfg.widths) if isinstance(block, int) else tuple(int(b) for b in block)
        if len(blocks) != len(cfg.widths) or min(blocks) < 1:
            raise ValueError(f"block must be a positive tile size, or one per stage ({len(cfg.widths)}), got {block}")
        self.stage_blocks = blocks
        self.block_stage = [st for st, d in enumerate(cfg.depths) for _ in range(d)]  # stage of every block
        super().__init__(cfg)
        for i, blk in enumerate(self.net.blocks):
            if blk.stride == 1 and self.out_hw[i] % self.tile(i):
                raise ValueError(f"block {i}: map size {self.out_hw[i]} is not divisible by the tile size "
                                 f"{self.tile(i)}")

    @property
    def block(self) -> int:
        """The tile size of the first stage (the only one when a single size was given)."""
        return self.stage_blocks[0]

    def tile(self, index: int) -> int:
        """Tile size of block ``index``: its stage's, at most the block's map."""
        return min(self.stage_blocks[self.block_stage[index]], self.out_hw[index])

    def whole_map(self, index: int) -> bool:
        """Block ``index`` has one tile per sample, run as a whole map."""
        return self.tile(index) == self.out_hw[index]

    def _make_gate(self, index: int, blk: BasicBlock) -> nn.Module:
        """Reduce-mask gate: average pool each tile of the block input, 1×1 convolution → one logit per tile."""
        if blk.stride != 1:
            return nn.Identity()
        conv = nn.Conv2d(blk.conv1.in_channels, 1, 1)
        nn.init.normal_(conv.weight, std=1.0 / blk.conv1.in_channels ** 0.5)
        nn.init.constant_(conv.bias, self.cfg.gate_bias)
        return nn.Sequential(nn.AvgPool2d(self.tile(index)), conv)

    def gate_flops(self, index: int) -> float:
        if isinstance(self.gates[index], nn.Identity):
            return 0.0
        c, s = self.net.blocks[index].conv1.in_channels, self.out_hw[index]
        return float(c * s * s + c * (s // self.tile(index)) ** 2)  # pooling (1 per input element) + 1×1 per tile

    def _tile_costs(self, index: int, tiles: torch.Tensor) -> torch.Tensor:
        """Per-sample FLOPs of running block ``index``'s residual on ``tiles`` (B,) tiles (float: relaxed in train
        mode): ``(t + 2)²`` positions of the first convolution per tile (its halo), ``t²`` of the second; a whole
        map has no halo."""
        blk, t = self.net.blocks[index], self.tile(index)
        if self.whole_map(index):
            return tiles * ((blk.conv1_fpp + blk.conv2_fpp) * t * t)
        return tiles * (blk.conv1_fpp * (t + 2) ** 2 + blk.conv2_fpp * t ** 2)

    def _run_block(self, i: int, h: torch.Tensor, mode: Mode
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        blk, s, t = self.net.blocks[i], self.out_hw[i], self.tile(i)
        d = binary_decision(self.gates[i](h)[:, 0], training=mode is Mode.TRAIN, relaxation=self.cfg.relaxation,
                            tau=self.tau,
                            threshold=self.threshold)  # (B, Th, Tw)
        pixels = tile_mask_to_pixels(d.hard, t, s, s)
        if mode is Mode.EXECUTE:
            out = (self.sample_execute(blk, h, d.hard.view(-1)) if self.whole_map(i)
                   else self.tile_execute(blk, h, d.hard, block=t))
        else:
            m = tile_mask_to_pixels(d.value, t, s, s) if mode is Mode.TRAIN else pixels
            out = blk.masked_dense(h, m)
        cost = self.gate_flops(i) + self._tile_costs(i, d.hard.flatten(1).sum(1, dtype=torch.float64))
        expected = None
        if mode is Mode.TRAIN:
            expected = self.gate_flops(i) + self._tile_costs(i, d.value.flatten(1).sum(1))
        return out, pixels, cost, expected

    @staticmethod
    def sample_execute(blk: BasicBlock, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """An identity block whose single tile is the whole map: the samples ``on`` (B,) bool run the block as a
        sub-batch (batch norm folded), the others keep ``x`` (written in place when autograd is off)."""
        w1, b1 = fold_conv_bn(blk.conv1, blk.bn1)
        w2, b2 = fold_conv_bn(blk.conv2, blk.bn2)

        def run(xs: torch.Tensor) -> torch.Tensor:
            hid = F.relu(F.conv2d(xs, w1, b1, padding=1))
            return F.relu(F.conv2d(hid, w2, b2, padding=1) + xs)

        idx = on.nonzero().squeeze(1)
        return run_rows(run, x, idx, inplace=not torch.is_grad_enabled())

    def tile_execute(self, blk: BasicBlock, x: torch.Tensor, tile_mask: torch.Tensor, *, block: int | None = None
                     ) -> torch.Tensor:
        """The residual branch of an identity block on active tiles: gather (halo 2) → conv → BN → ReLU →
        conv → BN → add → ReLU → scatter. Inactive tiles keep ``x`` (written in place: the network owns ``x``).
        ``block``: the tile size (default: the first stage's)."""
        bs = self.block if block is None else block
        tiles = ActivePositions.from_mask(tile_mask)
        if tiles.count == 0:
            return x
        b, c, hh, ww = x.shape
        xh = nhwc(x)
        patches = gather_tiles(xh, tiles, block=bs, halo=2)  # (T, C, bs+4, bs+4)
        w1, b1 = fold_conv_bn(blk.conv1, blk.bn1)
        hid = F.relu(F.conv2d(patches, w1, b1))  # (T, C, bs+2, bs+2)
        # the next convolution zero-pads at the image border: halo pixels outside the image must be 0, not relu(b1)
        hid = hid * _inside(tiles, block=bs, halo=1, height=hh, width=ww)
        w2, b2 = fold_conv_bn(blk.conv2, blk.bn2)
        res = F.conv2d(hid, w2, b2)  # (T, C, bs, bs)
        out = F.relu(res + patches[:, :, 2:-2, 2:-2])  # identity shortcut
        rows = xh.view(b * hh * ww, c)
        if torch.is_grad_enabled():
            rows = rows.clone()
        scatter_tiles(rows, tiles, out, block=bs, height=hh, width=ww)
        return rows.view(b, hh, ww, c).permute(0, 3, 1, 2)


@register_model
def sbnet_resnet20_cifar(*, num_classes: int = 10, block: int | Sequence[int] = 4, budget: float = 0.5,
                         budget_weight: float = 10.0, threshold: float = 0.5, gate_bias: float = 0.0,
                         relaxation: str = "gumbel") -> SBNetResNet:
    """ResNet-20 on 3×32×32 with per-tile (block × block) gates on its stride-1 blocks; ``block`` may be one tile
    size per stage (maps 32, 16, 8), e.g. ``[8, 8, 8]``: 16 and 4 tiles in the first two stages, whole maps in the
    third."""
    return SBNetResNet(DynConvConfig(num_classes=num_classes, budget=budget, budget_weight=budget_weight,
                                     threshold=threshold, gate_bias=gate_bias, relaxation=relaxation), block=block)


@register_model
def test_sbnet(*, num_classes: int = 10) -> SBNetResNet:
    """Tiny variant for tests: 3×8×8 inputs, 2×2 tiles, 2 stages (8, 16 channels)."""
    return SBNetResNet(DynConvConfig(in_chans=3, input_size=8, num_classes=num_classes, widths=(8, 16),
                                     depths=(2, 2), strides=(1, 2)), block=2)


@register_model
def test_sbnet_whole_map(*, num_classes: int = 10) -> SBNetResNet:
    """Tiny: as ``test_sbnet`` with 2×2 tiles in the first stage and the whole 4×4 map as the second's one tile."""
    return SBNetResNet(DynConvConfig(in_chans=3, input_size=8, num_classes=num_classes, widths=(8, 16),
                                     depths=(2, 2), strides=(1, 2)), block=(2, 8))
