"""Focused tests of the token-level models: ragged compaction, cost formula, ToMe merging, A-ViT halting,
DynamicViT gradients and calibration."""

import pytest
import torch

import dynaneural as dn
from dynaneural.compute.flops import static_flops
from dynaneural.spatial_wise.token.vit import RaggedLayout, VisionTransformer, ViTConfig, ViTCost, ragged_block


@pytest.mark.parametrize("cfg", [ViTConfig(dim=16, depth=2, heads=2), ViTConfig(in_chans=3, img_size=32, dim=24,
                                                                              depth=1, heads=3, mlp_ratio=3.0),
                                 ViTConfig(dim=32, depth=1, heads=2, stem="conv"),
                                 ViTConfig(in_chans=3, img_size=32, patch_size=8, dim=64, depth=1, heads=2, stem="conv")])
def test_analytic_cost_equals_hook_count(cfg):
    vit = VisionTransformer(cfg).eval()
    assert static_flops(vit, torch.randn(1, *cfg.input_shape)) == ViTCost(cfg).static_total()


def test_conv_stem_keeps_the_token_grid_and_rejects_bad_settings():
    cfg = ViTConfig(dim=64, depth=1, heads=2, stem="conv")
    assert cfg.stem_channels == (16, 32)
    assert VisionTransformer(cfg).embed(torch.randn(3, *cfg.input_shape)).shape == (3, cfg.num_tokens, 64)
    with pytest.raises(ValueError, match="power-of-two"):
        ViTConfig(img_size=27, patch_size=3, stem="conv")
    with pytest.raises(ValueError, match="stem must be"):
        ViTConfig(stem="convnext")


def test_padded_ragged_block_equals_unpadded_per_sample():
    cfg = ViTConfig(dim=16, depth=1, heads=2)
    vit = VisionTransformer(cfg).eval()
    t = vit.embed(torch.randn(5, *cfg.input_shape))
    mask = torch.rand(5, cfg.num_tokens, generator=torch.Generator().manual_seed(3)) < torch.linspace(0.1, 0.9, 5)[:, None]
    mask[:, 0] = True
    layout, index = RaggedLayout.from_mask(mask)
    assert layout.nmax == int(mask.sum(1).max()) and not layout.dense
    with torch.no_grad():
        out = ragged_block(vit.blocks[0], t.reshape(-1, cfg.dim).index_select(0, index), layout)
        for b in range(5):
            ref = vit.blocks[0](t[b:b + 1, mask[b]])[0]  # the sample alone, no padding at all
            torch.testing.assert_close(out[layout.row == b], ref, rtol=1e-5, atol=1e-5)


def test_layout_select_drops_empty_rows_and_keeps_order():
    layout = RaggedLayout.full(3, 4, torch.device("cpu"))
    keep = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    new, index = layout.select(keep)
    assert new.sample.tolist() == [0, 2] and new.counts.tolist() == [2, 3] and new.nmax == 3
    assert new.orig.tolist() == [0, 2, 1, 2, 3] and new.rank.tolist() == [0, 1, 0, 1, 2]
    assert index.tolist() == [0, 2, 9, 10, 11]
    assert new.per_sample(3).tolist() == [2, 0, 3]


def test_dynamicvit_hierarchical_keep_and_cost():
    model = dn.create_model("test_dynamicvit").eval()
    x = model.example_input(16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = model(x, mode="execute")
    keep = out.decisions["keep"]
    assert (keep[:, 1] <= keep[:, 0]).all(), "a dropped token stays dropped"
    cost = model.cost
    tok = out.decisions["tokens"].double()
    pred = sum(p.flops_per_token for p in model.predictors[:1]) * (model.cfg.vit.num_patches) + \
        model.predictors[1].flops_per_token * keep[:, 0].sum(1).double()
    expected = cost.embed + cost.head + cost.block(tok).sum(1) + pred
    torch.testing.assert_close(out.cost, expected, rtol=1e-12, atol=0)


def test_dynamicvit_gradients_reach_predictors():
    model = dn.create_model("test_dynamicvit").train()
    out = model(model.example_input(8), mode="train")
    assert set(out.aux_losses) == {"ratio0", "ratio1"}
    loss = torch.nn.functional.cross_entropy(out.logits, torch.zeros(8, dtype=torch.long)) + sum(out.aux_losses.values())
    loss.backward()
    for pred in model.predictors:
        g = pred.out_conv[-1].weight.grad
        assert g is not None and g.abs().sum() > 0


def test_dynamicvit_teacher_distillation_terms():
    model = dn.create_model("test_dynamicvit").train()
    teacher = VisionTransformer(model.cfg.vit)
    teacher.load_state_dict(model.vit.state_dict())
    model.set_teacher(teacher)
    assert not any(k.startswith("_teacher") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in dn.create_model("test_dynamicvit").named_parameters())
    x = model.example_input(8)
    out = model(x, mode="train")
    assert {"distill_kl", "distill_tokens"} <= set(out.aux_losses)
    sum(out.aux_losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher is frozen"
    assert model.vit.blocks[-1].mlp[0].weight.grad is not None
    model.set_teacher(None)
    assert "distill_kl" not in model(x, mode="train").aux_losses
    with pytest.raises(ValueError, match="teacher"):
        model.set_teacher(VisionTransformer(ViTConfig(in_chans=1, img_size=12, patch_size=4, dim=8, depth=1,
                                                      heads=2, mlp_ratio=2.0, num_classes=5)))


def test_dynamicvit_calibration_meets_budget():
    model = dn.create_model("test_dynamicvit").eval()
    x = model.example_input(64, generator=torch.Generator().manual_seed(9))
    res = model.calibrate(x, budget=0.6, unit="tokens")
    with torch.inference_mode():
        tok = model(x, mode="execute").decisions["tokens"].double()
    achieved = float(tok.mean()) / model.cfg.vit.num_tokens
    assert achieved == pytest.approx(res.mean_cost) and abs(achieved - 0.6) < 0.05
    with pytest.raises(ValueError, match="out of range"):
        model.calibrate(x, budget=5.0)


def test_avit_halting_identities():
    model = dn.create_model("test_avit").eval()
    x = model.example_input(16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        sim = model(x, mode="simulate")
    depth = sim.decisions["depth"]
    assert depth.min() >= 1 and depth.max() <= model.cfg.vit.depth and depth.unique().numel() > 1
    remainder = sim.ponder - depth  # ρ = N + R with the remainder R in (0, 1]
    assert (remainder > 0).all() and (remainder <= 1 + 1e-6).all()
    for i in range(model.cfg.vit.depth):  # a block processes exactly the tokens that have not halted before it
        assert torch.equal(sim.decisions["tokens"][:, i], (depth > i).sum(1))


def test_avit_act_weights_sum_to_one():
    """With every block the identity map, the ACT output must be the input state (weights sum to 1)."""
    model = dn.create_model("test_avit").eval()
    for blk in model.vit.blocks:
        for p in (blk.attn.proj, blk.mlp[2]):
            torch.nn.init.zeros_(p.weight)
            torch.nn.init.zeros_(p.bias)
    x = model.example_input(4)
    with torch.inference_mode():
        ref = model.vit.classify(model.vit.embed(x)[:, 0])
        for mode in ("simulate", "execute"):
            torch.testing.assert_close(model(x, mode=mode).logits, ref, rtol=1e-5, atol=1e-5)


def test_avit_losses_have_gradients():
    model = dn.create_model("test_avit").train()
    out = model(model.example_input(8), mode="train")
    assert set(out.aux_losses) == {"ponder", "distr_prior"}
    out.aux_losses["ponder"].backward()
    assert model.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_avit_high_threshold_halts_only_at_the_end():
    model = dn.create_model("test_avit", halt_threshold=100.0).eval()
    x = model.example_input(4)
    with torch.inference_mode():
        out = model(x, mode="execute")
    assert (out.decisions["depth"] == model.cfg.vit.depth).all()


def test_tome_merge_groups_and_sizes():
    model = dn.create_model("test_tome").eval()
    x = model.example_input(12, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = model(x, mode="execute")
    group, tokens = out.decisions["group"], out.decisions["tokens"]
    # every original token belongs to exactly one surviving token; the class token is never merged
    assert (group[:, 0] == 0).all()
    assert torch.equal(torch.tensor([g.unique().numel() for g in group]), tokens[:, -1])
    assert (tokens.diff(dim=1) <= 0).all()


def test_tome_fixed_r_is_the_paper_rule():
    model = dn.create_model("test_tome", threshold=-1.0, r=2).eval()
    with torch.inference_mode():
        out = model(model.example_input(6), mode="execute")
    n = model.cfg.vit.num_tokens
    assert out.decisions["tokens"].tolist() == [[n, n - 2, n - 4]] * 6


def test_tome_size_weighted_average():
    """Merged tokens are size-weighted means: with identity blocks, the class token's output (never merged) is
    unchanged and proportional attention keeps the logits those of the unmerged network."""
    model = dn.create_model("test_tome", threshold=-1.0, r=2).eval()
    for blk in model.vit.blocks:
        for p in (blk.attn.proj, blk.mlp[2]):
            torch.nn.init.zeros_(p.weight)
            torch.nn.init.zeros_(p.bias)
    x = model.example_input(3)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, mode="execute").logits, model.vit(x), rtol=1e-5, atol=1e-5)
