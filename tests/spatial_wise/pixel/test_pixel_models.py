"""DynConv, SBNet and SACT: costs, losses, masks and execute == simulate beyond the registry contract test."""

import pytest
import torch

import dynaneural as dn
from dynaneural.spatial_wise.pixel.dynconv import DynConvConfig, DynConvResNet
from dynaneural.spatial_wise.pixel.sbnet import SBNetResNet


def _x(model, n=6, seed=0):
    return model.example_input(n, generator=torch.Generator().manual_seed(seed))


def test_dynconv_cost_is_the_active_positions():
    model = dn.create_model("test_dynconv").eval()
    x = _x(model)
    with torch.inference_mode():
        out = model(x, mode="execute")
    manual = torch.full((6,), model.stem_flops + model.head_flops, dtype=torch.float64)
    for i, m in enumerate(out.masks):
        blk = model.net.blocks[i]
        manual += model.gate_flops(i) + blk.position_costs(m)
    torch.testing.assert_close(out.cost, manual, rtol=1e-12, atol=0)
    assert out.cost.max() < model.static_total + sum(model.gate_flops(i) for i in range(len(model.gates)))
    assert [tuple(m.shape) for m in out.masks] == [(6, 8, 8), (6, 8, 8), (6, 4, 4)]


def test_dynconv_threshold_moves_cost_and_all_off_pays_only_fixed_parts():
    model = dn.create_model("test_dynconv").eval()
    x = _x(model, 16)
    costs = []
    for t in (0.0, 0.3, 0.5, 0.7, 1.0):
        model.threshold = t
        with torch.inference_mode():
            costs.append(float(model(x, mode="execute").cost.mean()))
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    # threshold 1: no position active → stem, head, gates and projection shortcuts only
    fixed = model.stem_flops + model.head_flops + sum(model.gate_flops(i) for i in range(3))
    fixed += model.net.blocks[2].shortcut_fpp * 16
    assert abs(costs[-1] - fixed) < 1e-6
    # threshold 0: every position active; conv1 at the dilated (= full) mask → static cost + gates
    assert abs(costs[0] - model.static_total - sum(model.gate_flops(i) for i in range(3))) < 1e-6


def test_dynconv_budget_loss_trains_the_gates():
    model = dn.create_model("test_dynconv").train()
    out = model(_x(model, 8), mode="train")
    assert "budget" in out.aux_losses
    out.aux_losses["budget"].backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in model.gates)


def test_dynconv_straight_through_trains_on_the_inference_masks():
    import pytest

    cfg = dict(in_chans=3, input_size=8, widths=(8, 16), depths=(2, 1), strides=(1, 2))
    torch.manual_seed(0)
    model = DynConvResNet(DynConvConfig(**cfg, relaxation="straight_through", threshold=0.45)).eval()
    x = _x(model, 8)
    out = model(x, mode="train")  # BN in eval: the train forward must be exactly the simulate forward
    with torch.no_grad():
        sim = model(x, mode="simulate")
    torch.testing.assert_close(out.logits, sim.logits)
    for m_train, m_sim in zip(out.masks, sim.masks, strict=True):
        assert torch.equal(m_train, m_sim)
    (out.logits.sum() + out.aux_losses["budget"]).backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in model.gates)
    with pytest.raises(ValueError, match="relaxation"):
        DynConvConfig(**cfg, relaxation="reinforce")


def test_dynconv_from_static_and_training_progress():
    model = DynConvResNet(DynConvConfig(in_chans=3, input_size=8, widths=(8,), depths=(2,), strides=(1,),
                                        tau_start=2.0, tau_end=0.5))
    static = model.to_static()
    for p in static.parameters():
        p.data.normal_()
    model.load_static(static)
    torch.testing.assert_close(model.net.stem[0].weight, static.stem[0].weight)
    model.set_train_progress(1.0)
    assert abs(model.tau - 0.5) < 1e-9


def test_sbnet_tile_execution_equals_masked_dense_and_charges_halos():
    model = dn.create_model("test_sbnet").eval()
    assert isinstance(model, SBNetResNet)
    x = _x(model, 5)
    with torch.inference_mode():
        sim, exe = model(x, mode="simulate"), model(x, mode="execute")
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-5, atol=1e-5)
    for m in exe.masks:  # pixel masks are unions of whole 2×2 tiles
        s = m.shape[1] // 2
        tiles = m.view(5, s, 2, s, 2)
        assert bool((tiles.all(2).all(3) == tiles.any(2).any(3)).all())
    blk = model.net.blocks[0]
    assert model._tile_costs(0, torch.ones(1, dtype=torch.float64)).item() == blk.conv1_fpp * 16 + blk.conv2_fpp * 4


def test_sbnet_whole_map_tiles_run_samples_as_a_sub_batch_without_halo():
    model = dn.create_model("test_sbnet_whole_map").eval()
    assert [model.tile(i) for i in range(4)] == [2, 2, 4, 4] and model.whole_map(3) and not model.whole_map(1)
    x = _x(model, 6)
    with torch.inference_mode():
        model.gates[3][1].bias.fill_(0.0)
        model.gates[3][1].weight.copy_(torch.randn_like(model.gates[3][1].weight))
        sim, exe = model(x, mode="simulate"), model(x, mode="execute")
    torch.testing.assert_close(exe.logits, sim.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exe.cost, sim.cost, rtol=1e-12, atol=0)
    on = exe.masks[-1].flatten(1)
    assert bool((on.all(1) == on.any(1)).all())  # the last block is on or off for the whole map
    blk = model.net.blocks[3]
    assert model._tile_costs(3, torch.ones(1, dtype=torch.float64)).item() == (blk.conv1_fpp + blk.conv2_fpp) * 16
    # the whole-map path runs the block on the selected samples only
    calls = []
    handle = torch.nn.functional.conv2d
    def spy(inp, *a, **k):
        calls.append(inp.shape[0])
        return handle(inp, *a, **k)
    h = torch.randn(6, 16, 4, 4).contiguous(memory_format=torch.channels_last).relu()
    sel = torch.tensor([True, False, False, True, False, False])
    torch.nn.functional.conv2d = spy
    try:
        with torch.inference_mode():
            out = model.sample_execute(blk, h.clone(), sel)
    finally:
        torch.nn.functional.conv2d = handle
    assert calls == [2, 2]
    with torch.inference_mode():
        ref = blk.masked_dense(h, sel[:, None, None].expand(6, 4, 4))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tile size"):
        dn.create_model("sbnet_resnet20_cifar", block=[8, 8])


def test_sact_halting_semantics():
    model = dn.create_model("test_sact").eval()
    x = _x(model, 7)
    with torch.inference_mode():
        sim, exe = model(x, mode="simulate"), model(x, mode="execute")
    for a, b in zip(sim.units_maps, exe.units_maps, strict=True):
        torch.testing.assert_close(a, b)
        assert int(a.min()) >= 1 and int(a.max()) <= 3
    for p in exe.ponder_maps:
        assert bool((p >= 1).all()) and bool((p <= 4).all())
    torch.testing.assert_close(exe.cost, sim.cost, rtol=1e-9, atol=0)
    # positions that halt immediately run only the first unit of every stage
    for units in model.halting:
        for hu in units:
            hu.conv.bias.data.fill_(20.0)
    with torch.inference_mode():
        out = model(x, mode="execute")
    assert all(int(u.max()) == 1 for u in out.units_maps)
    assert float(out.decisions["active_fraction"].max()) == 0.0


def test_sact_ponder_loss_has_gradient_to_halting_units():
    model = dn.create_model("test_sact").train()
    out = model(_x(model, 4), mode="train")
    out.aux_losses["ponder"].backward()
    assert model.halting[0][0].conv.weight.grad.abs().sum() > 0
