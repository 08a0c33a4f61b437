"""Sparse upcycling and the straight-through combine weights it relies on."""

import dataclasses

import pytest
import torch

import dynaneural as dn
from dynaneural.sample_wise.moe import MoEFeedForward
from dynaneural.sample_wise.moe.upcycle import upcycle


def _dense_of(name: str) -> torch.nn.Module:
    model = dn.create_model(name, seed=0)
    cfg = dataclasses.replace(model.config, num_experts=1, top_k=1, capacity_factor=None, routing="top_k")
    torch.manual_seed(0)
    return type(model)(cfg)


@pytest.mark.parametrize("name", ["test_moe_convnet", "test_moe_mlp", "test_moe_transformer"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_computes_the_dense_function(name, top_k):
    dense = _dense_of(name).eval()
    moe = upcycle(dense, num_experts=4, top_k=top_k, seed=1)
    assert not moe.training and [m.num_experts for m in moe.moe_layers()] == [4] * len(dense.moe_layers())
    x = dense.example_input(5, generator=torch.Generator().manual_seed(2))
    ref = dense(x)
    for mode in ("execute", "simulate"):
        torch.testing.assert_close(moe(x, mode=mode).logits, ref.logits, rtol=1e-5, atol=1e-6)
    # cost: each token pays its k experts of the dense width and a router over 4 experts instead of 1
    routers = sum(m.dim * 3 * t for m, t in zip(moe.moe_layers(), _tokens(moe, x), strict=True))
    experts = sum((top_k - 1) * m.expert_flops() * t for m, t in zip(moe.moe_layers(), _tokens(moe, x), strict=True))
    torch.testing.assert_close(moe(x).cost, ref.cost + routers + experts)


def _tokens(model, x):
    return [r.shape[1] for r in model(x[:1]).router_logits]


def test_upcycled_routers_learn_and_the_experts_diverge():
    dense = _dense_of("test_moe_convnet").train()
    moe = upcycle(dense, num_experts=4, seed=1)
    x = dense.example_input(8, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    out = moe(x)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in moe.moe_layers())  # the task reaches the routers
    opt.step()
    w = moe.moe_layers()[0].w_gate_up
    assert not torch.equal(w[0], w[1])  # experts that got different tokens now differ


def test_straight_through_weights_forward_one_and_route_like_switch():
    torch.manual_seed(0)
    st = MoEFeedForward(8, 16, 4, top_k=1, straight_through_weights=True)
    switch = MoEFeedForward(8, 16, 4, top_k=1)
    switch.load_state_dict(st.state_dict())
    x = torch.randn(32, 8)
    r = st.route(x, mode="train")
    assert torch.allclose(r.weight, torch.ones_like(r.weight))  # forward: each token's expert weighted by exactly 1
    for layer in (st, switch):
        layer(x, mode="train").output.sum().backward()  # a loss linear in the output: dL/dy is the same for both
    torch.testing.assert_close(st.router.weight.grad, switch.router.weight.grad)
    plain = MoEFeedForward(8, 16, 4, top_k=1, normalize_weights=True)
    plain.load_state_dict(st.state_dict())
    plain(x, mode="train").output.sum().backward()
    g = plain.router.weight.grad
    assert g is None or g.abs().max() < 1e-6 * st.router.weight.grad.abs().max()  # renormalised top-1: w/w, none
    with pytest.raises(ValueError, match="top-k"):
        MoEFeedForward(8, 16, 4, routing="expert_choice", straight_through_weights=True)


def test_upcycle_rejects_what_it_cannot_upcycle():
    with pytest.raises(ValueError, match="num_experts=1"):
        upcycle(dn.create_model("test_moe_convnet"), num_experts=4)
    dense = _dense_of("test_moe_convnet")
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(dense, num_experts=1)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense, num_experts=4, top_k=5)
    with pytest.raises(TypeError, match="MoE stacks"):
        upcycle(dn.create_model("test_exit_convnet"), num_experts=4)
