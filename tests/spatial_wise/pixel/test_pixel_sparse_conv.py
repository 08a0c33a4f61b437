"""The sparse (active-position) and block-sparse (tile) convolution kernels equal the dense convolution."""

import pytest
import torch
import torch.nn.functional as F

import dynaneural.spatial_wise.pixel.sparse_conv as sparse_conv_module
from dynaneural.spatial_wise.pixel._resnet import BasicBlock
from dynaneural.spatial_wise.pixel.sbnet import block_sparse_conv2d, tile_mask_to_pixels
from dynaneural.spatial_wise.pixel.sparse_conv import ActivePositions, SparseConv2d, dilate_mask, sparse_conv2d


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 1, 2, 2),
                                                            (3, 2, 2, 1), (1, 1, 0, 1), (1, 2, 0, 1), (5, 1, 2, 1)])
@pytest.mark.parametrize("pad_factor", [0, 10**9], ids=["border-taps", "padded-copy"])
def test_sparse_conv_equals_dense_at_active_positions(kernel, stride, padding, dilation, pad_factor, monkeypatch):
    """Both ways of handling the windows that cross the border: one padded copy of the input, or re-gathering
    those windows tap by tap (the choice depends on how many there are; forced here)."""
    monkeypatch.setattr(sparse_conv_module, "_PAD_FACTOR", pad_factor)
    g = torch.Generator().manual_seed(kernel * 100 + stride * 10 + padding)
    x = torch.randn(3, 5, 11, 9, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, kernel, kernel, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)
    mask = torch.rand(ref.shape[0], *ref.shape[2:], generator=g) < 0.4  # a different mask per sample
    mask[1] = False  # one sample with nothing active
    out = sparse_conv2d(x, w, b, mask, stride=stride, padding=padding, dilation=dilation)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref * mask[:, None], rtol=1e-12, atol=1e-12)


def test_sparse_conv_full_mask_channels_last_float32_and_fill():
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 16, 3, 3), torch.randn(8)
    ref = F.conv2d(x, w, b, padding=1)
    full = torch.ones(2, 12, 12, dtype=torch.bool)
    torch.testing.assert_close(sparse_conv2d(x, w, b, full, padding=1), ref, rtol=1e-5, atol=1e-5)
    fill = torch.randn_like(ref)
    mask = torch.rand(2, 12, 12) < 0.3
    out = sparse_conv2d(x, w, b, mask, padding=1, fill=fill)
    torch.testing.assert_close(out, torch.where(mask[:, None], ref, fill), rtol=1e-5, atol=1e-5)


def test_sparse_conv_rejects_bad_mask():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="output shape"):
        sparse_conv2d(x, w, None, torch.ones(2, 7, 7, dtype=torch.bool), padding=1)
    with pytest.raises(ValueError, match="bool"):
        ActivePositions.from_mask(torch.ones(2, 8, 8))


def test_sparse_conv_module_gradients_match_dense():
    conv = SparseConv2d(4, 6, 3, padding=1, stride=2).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, 5) < 0.5
    (conv(x, mask) ** 2).sum().backward()
    gx, gw = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    ((conv(x) * mask[:, None]) ** 2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, conv.weight.grad)
    assert conv.flops_per_position == 4 * 9 * 6


def test_dilate_mask():
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 0, 0] = m[0, 3, 3] = True
    d = dilate_mask(m)
    assert int(d.sum()) == 4 + 9 and bool(d[0, 1, 1]) and bool(d[0, 4, 4]) and not bool(d[0, 0, 3])


@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 2)])
def test_masked_block_execute_equals_masked_dense(cin, cout, stride):
    torch.manual_seed(0)
    blk = BasicBlock(cin, cout, stride).double().eval()
    for bn in (blk.bn1, blk.bn2):  # non-trivial inference statistics to exercise the folding
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.relu(torch.randn(3, cin, 10, 10, dtype=torch.float64))
    mask = torch.rand(3, 10 // stride, 10 // stride) < 0.4
    with torch.no_grad():
        ref = blk.masked_dense(x, mask)
        x_before = x.clone()
        out = blk.masked_execute(x, mask)
        torch.testing.assert_close(x, x_before)  # not in place by default
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(blk.masked_execute(x.clone(), mask, inplace=True), ref, rtol=1e-10, atol=1e-10)
        none = torch.zeros_like(mask)
        torch.testing.assert_close(blk.masked_execute(x, none), blk.masked_dense(x, none))


@pytest.mark.parametrize("h,w,block", [(8, 8, 4), (9, 11, 4), (6, 6, 2)])
def test_block_sparse_conv_equals_dense_on_active_tiles(h, w, block):
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, 5, h, w, generator=g, dtype=torch.float64)
    wt, b = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    tiles = torch.rand(2, -(-h // block), -(-w // block), generator=g) < 0.5
    out = block_sparse_conv2d(x, wt, b, tiles, block=block)
    ref = F.conv2d(x, wt, b, padding=1) * tile_mask_to_pixels(tiles, block, h, w)[:, None]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w,block,halo", [(8, 8, 4, 1), (9, 11, 4, 2), (6, 6, 2, 0)])
def test_gather_tiles_equals_slices_of_the_zero_padded_map(h, w, block, halo):
    from dynaneural.spatial_wise.pixel.sbnet import gather_tiles
    from dynaneural.spatial_wise.pixel.sparse_conv import ActivePositions, nhwc

    g = torch.Generator().manual_seed(h + w + halo)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    tiles = ActivePositions.from_mask(torch.rand(2, -(-h // block), -(-w // block), generator=g) < 0.6)
    size = block + 2 * halo
    padded = F.pad(x, (halo, size + block, halo, size + block))  # room for a ragged last tile's patch
    ref = torch.stack([padded[b, :, i * block:i * block + size, j * block:j * block + size]
                       for b, i, j in zip(tiles.batch.tolist(), tiles.row.tolist(), tiles.col.tolist(), strict=True)])
    torch.testing.assert_close(gather_tiles(nhwc(x), tiles, block=block, halo=halo), ref, rtol=0, atol=0)


def test_sbnet_patch_coordinates_are_built_once_per_shape():
    from dynaneural.spatial_wise.pixel import sbnet

    x, wt = torch.randn(2, 3, 10, 10), torch.randn(4, 3, 3, 3)
    tiles = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    tiles[0, 0, 0] = True
    sbnet._patch_table.cache_clear()
    first = block_sparse_conv2d(x, wt, None, tiles, block=4)
    misses = sbnet._patch_table.cache_info().misses  # gather (halo 1) and scatter (halo 0) tables
    assert misses == 2
    again = block_sparse_conv2d(x, wt, None, tiles, block=4)
    assert sbnet._patch_table.cache_info().misses == misses and sbnet._patch_table.cache_info().hits >= 2
    torch.testing.assert_close(again, first, rtol=0, atol=0)
