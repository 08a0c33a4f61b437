"""The CNN with patch-level MoE blocks: token layout, per-sample cost, the dense twin, channels-last inputs.

The registry's ``test_moe_convnet*`` variants also go through every contract test (modes agree, batched equals
one at a time, all-on equals the static twin, bad inputs)."""

import pytest
import torch

import dynaneural as dn
from dynaneural.compute import count_flops


def test_mnist_layout_routes_every_pixel_of_both_maps():
    model = dn.create_model("moe_convnet_mnist", seed=0).eval()
    out = model(model.example_input(3))
    # blocks after the 14×14 (64 channels) and the 7×7 (128 channels) layers
    assert [tuple(r.shape) for r in out.router_logits] == [(3, 196, 8), (3, 49, 8)]
    assert out.decisions["moe0/experts"].shape == (3, 196 * 2)
    assert out.decisions["moe1/experts"].shape == (3, 49 * 2)
    assert [m.dim for m in model.moe_layers()] == [64, 128]
    assert out.tokens_per_expert.sum(1).tolist() == [3 * 196 * 2, 3 * 49 * 2]  # dropless top-2


def test_cost_is_dense_part_plus_each_tokens_router_and_experts():
    model = dn.create_model("moe_convnet_cifar10", seed=0).eval()
    out = model(model.example_input(2))
    moe = model.moe_layers()
    routed = sum(64 * (m.router_flops() + 2 * m.expert_flops()) for m in moe)  # 64 tokens, top-2, dropless
    assert torch.allclose(out.cost, torch.full((2,), model._dense_flops + routed, dtype=out.cost.dtype))
    # the dense part is the convolutions, norms and head, counted from the layers themselves
    convs = count_flops(torch.nn.Sequential(*model.layers), model.example_input(1)).total
    assert model._dense_flops > convs > 0.9 * model._dense_flops


def test_dense_twin_flops_match_fvcore(fvcore_macs):
    # the dense twin of equal active FLOPs (one expert of width 256): what the MoE is compared against. (With
    # E > 1 the static twin's (1, N, d) @ (E, d, 2f) broadcast is miscounted by fvcore's matmul rule, which takes
    # the batch from the first operand.)
    model = dn.create_model("moe_convnet_cifar10", seed=0, num_experts=1, top_k=1, hidden=256).eval()
    twin = model.to_static()
    x = model.example_input(2)
    assert count_flops(twin, x).total == pytest.approx(fvcore_macs(twin, x), rel=0.01)
    with model.all_on():
        assert model(x).cost[0].item() == pytest.approx(count_flops(twin, x).total, rel=1e-6)


def test_dense_twin_of_equal_active_flops():
    moe = dn.create_model("moe_convnet_cifar10", seed=0).eval()
    dense = dn.create_model("moe_convnet_cifar10", seed=0, num_experts=1, top_k=1, hidden=256).eval()
    x = moe.example_input(2)
    c_moe, c_dense = moe(x).cost[0].item(), dense(x).cost[0].item()
    assert c_dense < c_moe < 1.01 * c_dense  # the MoE pays only its 8-way router on top
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(moe) > 2 * n(dense)


def test_channels_last_input_gives_the_same_result():
    model = dn.create_model("moe_convnet_cifar10", seed=0).eval()
    x = model.example_input(4, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(cl.decisions["moe1/experts"], ref.decisions["moe1/experts"])


def test_depth_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="depth"):
        dn.create_model("moe_convnet_mnist", depth=4)
