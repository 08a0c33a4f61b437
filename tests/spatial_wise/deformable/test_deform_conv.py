"""Deformable convolution: gradient-checked, and equal to an independent float64 reference from the papers'
bilinear-kernel formula (and to ``grid_sample``)."""

import pytest
import torch
import torch.nn.functional as F

import dynaneural as dn
from dynaneural.compute.flops import count_flops
from dynaneural.spatial_wise.deformable.deform_conv import DeformConv2d, deform_conv2d, deform_flops_per_position


def reference_deform_conv2d(x, offset, weight, bias=None, mask=None, *, stride=1, padding=0, dilation=1):
    """Written independently of the op: every sample is Σ_q G(q, p) x(q) over the whole image with
    G(q, p) = max(0, 1 − |q_y − p_y|) · max(0, 1 − |q_x − p_x|) (Dai et al., eq. 3–4), loops over kernel points."""
    b, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    g = offset.shape[1] // (2 * kh * kw)
    cg = c // g
    out = torch.zeros(b, co, ho, wo, dtype=x.dtype)
    rows = torch.arange(h, dtype=x.dtype)
    cols = torch.arange(w, dtype=x.dtype)
    oy = torch.arange(ho, dtype=x.dtype)[:, None] * stride - padding
    ox = torch.arange(wo, dtype=x.dtype)[None, :] * stride - padding
    for gi in range(g):
        xg = x[:, gi * cg:(gi + 1) * cg]  # (B, Cg, H, W)
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                py = oy + i * dilation + offset[:, 2 * (gi * kh * kw + k)]  # (B, Ho, Wo)
                px = ox + j * dilation + offset[:, 2 * (gi * kh * kw + k) + 1]
                gy = torch.relu(1 - (rows[None, None, None, :] - py[..., None]).abs())  # (B, Ho, Wo, H)
                gx = torch.relu(1 - (cols[None, None, None, :] - px[..., None]).abs())  # (B, Ho, Wo, W)
                val = torch.einsum("bchw,bpqh,bpqw->bcpq", xg, gy, gx)  # (B, Cg, Ho, Wo)
                if mask is not None:
                    val = val * mask[:, gi * kh * kw + k][:, None]
                out = out + torch.einsum("oc,bcpq->bopq", weight[:, gi * cg:(gi + 1) * cg, i, j], val)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _case(seed, *, groups=1, modulated=True, stride=1, padding=1, dilation=1, c=4, h=6, w=5, k=3, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    offset = scale * torch.randn(2, 2 * groups * k * k, ho, wo, generator=g, dtype=torch.float64)
    weight = torch.randn(3, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, groups * k * k, ho, wo, generator=g, dtype=torch.float64) if modulated else None
    return x, offset, weight, bias, mask, dict(stride=stride, padding=padding, dilation=dilation)


CASES = [dict(), dict(modulated=False), dict(stride=2), dict(padding=0), dict(dilation=2, padding=2),
         dict(groups=2), dict(k=1, padding=0)]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_independent_reference(case):
    x, offset, weight, bias, mask, kw = _case(1, **case)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, mask, **kw),
                               reference_deform_conv2d(x, offset, weight, bias, mask, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [dict(), dict(modulated=False, stride=2), dict(groups=2)], ids=["v2", "v1s2", "g2"])
def test_gradcheck_and_gradients_match_reference(case):
    x, offset, weight, bias, mask, kw = _case(2, c=2, h=4, w=4, **case)
    inputs = [t.requires_grad_() for t in (x, offset, weight, bias) + ((mask,) if mask is not None else ())]

    def op(x, offset, weight, bias, *m):
        return deform_conv2d(x, offset, weight, bias, m[0] if m else None, **kw)

    assert torch.autograd.gradcheck(op, tuple(inputs), eps=1e-6, atol=1e-5)
    grads = torch.autograd.grad(op(*inputs).square().sum(), inputs)
    ref_grads = torch.autograd.grad(
        reference_deform_conv2d(*inputs[:4], inputs[4] if len(inputs) > 4 else None, **kw).square().sum(), inputs)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_zero_offsets_is_the_plain_convolution():
    x, offset, weight, bias, _, kw = _case(3)
    torch.testing.assert_close(deform_conv2d(x, torch.zeros_like(offset), weight, bias, **kw),
                               F.conv2d(x, weight, bias, **kw), rtol=1e-12, atol=1e-12)


def test_sampling_matches_grid_sample():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    offset = 2.0 * torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64)
    # a 1×1 identity kernel turns the op into pure bilinear sampling at p + Δp
    out = deform_conv2d(x, offset, torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1))
    py = torch.arange(7, dtype=torch.float64)[:, None] + offset[:, 0]
    px = torch.arange(6, dtype=torch.float64)[None, :] + offset[:, 1]
    grid = torch.stack([2 * px / 5 - 1, 2 * py / 6 - 1], -1)  # align_corners=True normalisation
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bad_shapes_are_rejected():
    x, offset, weight, bias, mask, kw = _case(5)
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d(x, offset[:, :-1], weight, bias, mask, **kw)
    with pytest.raises(ValueError, match="mask"):
        deform_conv2d(x, offset, weight, bias, mask[:, :-1], **kw)


def test_layer_flops_and_module_behaviour():
    layer = DeformConv2d(8, 16, 3, padding=1, modulated=True)
    x = torch.randn(2, 8, 5, 5)
    extra, conv = deform_flops_per_position(8, 16, 3, modulated=True)
    assert conv == 8 * 9 * 16 and extra == 8 * 9 * 27 + 4 * 8 * 9 + 8 * 9
    assert count_flops(torch.nn.Sequential(layer), x).total == (extra + conv) * 25  # the layer's own flops()
    # zero-initialised offsets, modulation 0.5: half the plain convolution at start (DCNv2's init)
    torch.testing.assert_close(layer(x), 0.5 * layer(x, deform=False), rtol=1e-5, atol=1e-5)


def test_deform_resnet_offsets_learn_and_cost_counts_the_machinery():
    model = dn.create_model("test_deform_resnet").train()
    x = model.example_input(4, generator=torch.Generator().manual_seed(0))
    out = model(x)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    dc = model.net.blocks[0].conv2
    assert isinstance(dc, DeformConv2d) and dc.offset_conv.weight.grad.abs().sum() > 0
    with torch.inference_mode(), model.all_on():
        static_cost = model(x, mode="execute").cost
    assert bool((out.cost - static_cost == model.deform_extra).all()) and model.deform_extra > 0
