"""Focused tests of the region-level models: crop coordinates, early stopping, REINFORCE, the STN sampler."""

import pytest
import torch

import dynaneural as dn
from dynaneural.spatial_wise.region.gfnet import GFNetConfig, crop_patches, patch_origins
from dynaneural.spatial_wise.region.stn import dense_bilinear_crop


def test_crop_coordinates_match_slices():
    cfg = GFNetConfig(input_size=28, patch=14, grid=3)
    x = torch.randn(9, 1, 28, 28)
    loc = torch.arange(9)
    crops = crop_patches(x, loc, cfg)
    top, left = patch_origins(cfg, loc)
    assert top.tolist() == [0, 0, 0, 7, 7, 7, 14, 14, 14] and left.tolist() == [0, 7, 14] * 3
    for i in range(9):
        torch.testing.assert_close(crops[i], x[i, :, top[i]:top[i] + 14, left[i]:left[i] + 14])


def test_gfnet_confident_samples_stop_and_pay_less():
    model = dn.create_model("test_gfnet").eval()
    x = model.example_input(32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = model(x, mode="execute")
    steps = out.decisions["exit"]
    assert steps.unique().numel() > 1
    # a sample pays exactly the steps it took, and never looks at patches after it stopped
    expected = torch.tensor([sum(model.step_cost(s) for s in range(k + 1)) for k in steps.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(out.cost, expected, rtol=1e-12, atol=0)
    patch = out.decisions["patch"]
    for k, row in zip(steps.tolist(), patch, strict=True):
        assert (row[:k] >= 0).all() and (row[k:] == -1).all()


def test_gfnet_reinforce_loss_trains_the_policy():
    model = dn.create_model("test_gfnet").train()
    x = model.example_input(16)
    y = torch.randint(0, model.num_classes, (16,))
    out = model(x, mode="train")
    assert out.policy is not None and len(out.policy) == model.cfg.steps
    parts = model.loss(out, y)
    parts["loss"].backward()
    assert model.policy_head.weight.grad is not None and model.policy_head.weight.grad.abs().sum() > 0
    assert model.focus[0][0].weight.grad.abs().sum() > 0


def test_gfnet_calibration_meets_budget():
    model = dn.create_model("test_gfnet").eval()
    x = model.example_input(128, generator=torch.Generator().manual_seed(8))
    res = model.calibrate(x, budget=0.7)
    assert abs(res.mean_cost - 0.7) < 0.1


def test_stn_sampler_matches_dense_reference_and_identity_is_resize():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    params = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.3, -0.2], [0.35, -0.6, 0.6]], dtype=torch.float64)
    model = dn.create_model("test_stn")
    ref = dense_bilinear_crop(x, params, 4)
    torch.testing.assert_close(model.sampler(x, params), ref)
    # the identity window at half resolution averages 2×2 blocks (bilinear at the centres of the output pixels)
    torch.testing.assert_close(ref[0], torch.nn.functional.avg_pool2d(x[:1], 2)[0])


def test_stn_gradient_reaches_the_localisation_net():
    model = dn.create_model("test_stn").train()
    out = model(model.example_input(8), mode="train")
    out.logits.sum().backward()
    assert model.loc[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["test_gfnet", "test_stn"])
def test_render_writes_pngs(tmp_path, name):
    from dynaneural.spatial_wise.region.visualize import render

    model = dn.create_model(name)
    paths = render(model, model.example_input(2), tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_static_glance_is_gfnet_step_zero_on_its_own():
    """Same pieces as GFNet's glance path: with GFNet's weights copied in, it gives GFNet's step-0 logits and FLOPs."""
    from dynaneural.compute.flops import static_flops
    from dynaneural.spatial_wise.region.gfnet import StaticGlance

    gf = dn.create_model("test_gfnet").eval()
    glance = StaticGlance(gf.cfg).eval()
    glance.load_state_dict({**{k: v for k, v in gf.state_dict().items() if k.split(".")[0] in ("glance", "gru")},
                            **{f"head.{k}": v for k, v in gf.heads[0].state_dict().items()}})
    x = torch.randn(6, *gf.input_shape)
    with torch.no_grad():
        step0 = gf(x, mode="simulate").step_logits[0]
        torch.testing.assert_close(glance(x), step0)
    assert static_flops(glance, x[:1]) == pytest.approx(gf.step_cost(0))
    with pytest.raises(ValueError):
        glance(torch.randn(2, 3, 8, 8))
