"""The shared expert of DeepSeekMoE (``MoEFeedForward(shared_hidden=...)``): a dense SwiGLU every token runs beside
the routed experts, in every mode, in the ledger, in the static twin and in upcycling (its gradients are checked in
test_moe_layer.py)."""

import pytest
import torch
import torch.nn.functional as F

import dynaneural as dn
from dynaneural.sample_wise.moe import DenseMixtureFFN, MoEFeedForward
from dynaneural.sample_wise.moe.upcycle import upcycle


def _swiglu(layer, x):
    """The shared expert written out from its weights."""
    gate = x @ layer.gate_up.weight[:layer.hidden].T
    up = x @ layer.gate_up.weight[layer.hidden:].T
    return (F.silu(gate) * up) @ layer.down.weight.T


def _routed_only(m):
    """The same layer without its shared expert (same router and experts)."""
    ref = MoEFeedForward(m.dim, m.hidden, m.num_experts, top_k=m.top_k, capacity_factor=m.capacity_factor,
                         group_size=m.group_size)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("shared.")})
    return ref


@pytest.mark.parametrize("mode", ["execute", "simulate", "train"])
@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_k=2), dict(top_k=1, capacity_factor=0.5)])
def test_output_is_routed_sum_plus_shared_expert(mode, kwargs):
    torch.manual_seed(0)
    m = MoEFeedForward(12, 16, 4, shared_hidden=24, group_size=10, **kwargs)
    x = torch.randn(30, 12)
    with torch.no_grad():
        res = m(x, mode=mode)
        routed = _routed_only(m)(x, mode=mode)
        expected = routed.output + _swiglu(m.shared, x)
    torch.testing.assert_close(res.output, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.routing.expert, routed.routing.expert)  # the shared expert does not change the routing


def test_dropped_token_still_runs_the_shared_expert_and_pays_for_it():
    torch.manual_seed(0)
    m = MoEFeedForward(6, 8, 4, top_k=1, capacity_factor=0.25, group_size=8, shared_hidden=5)
    x = torch.randn(8, 6)
    with torch.no_grad():
        res = m(x, mode="execute")
        shared = _swiglu(m.shared, x)
    dropped = res.routing.experts_per_token == 0
    assert dropped.any()  # capacity 1 per expert over 8 tokens in one group drops some
    torch.testing.assert_close(res.output[dropped], shared[dropped], rtol=1e-5, atol=1e-6)
    expected = 6 * 4 + 3 * 6 * 5 + res.routing.experts_per_token.double() * (3 * 6 * 8)
    torch.testing.assert_close(res.token_flops, expected, rtol=0, atol=0)
    assert m.shared_flops() == 3 * 6 * 5 and MoEFeedForward(6, 8, 4).shared_flops() == 0


def test_all_on_equals_dense_mixture_with_the_shared_expert():
    m = MoEFeedForward(6, 10, 4, top_k=1, shared_hidden=7)
    x = torch.randn(9, 6)
    twin = DenseMixtureFFN(m)
    with torch.no_grad():
        m.set_all_on(True)
        out = m(x, mode="execute")
        m.set_all_on(False)
        ref = twin(x)
        mixture = DenseMixtureFFN(_routed_only(m))(x)  # the routed mixture alone (tested in test_moe_layer.py)
    torch.testing.assert_close(ref, mixture + _swiglu(m.shared, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-5)
    assert twin.flops((x,), ref) == 9 * (6 * 4 + 3 * 6 * 7 + 4 * 3 * 6 * 10)


def test_bad_shared_width_is_rejected():
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="shared_hidden"):
            MoEFeedForward(6, 10, 4, shared_hidden=bad)


def test_model_ledger_charges_the_shared_expert_per_token():
    model = dn.create_model("test_moe_transformer_shared").eval()
    x = model.example_input(5, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = model(x, mode="execute")
    moe = model.blocks[0].moe
    used = (out.decisions["moe0/experts"] >= 0).sum(1).double()
    expected = (model._dense_flops + model.num_tokens * (moe.router_flops() + moe.shared_flops())
                + used * moe.expert_flops())
    torch.testing.assert_close(out.cost, expected, rtol=1e-12, atol=0)
    assert (out.decisions["moe_dropped"] > 0).any()


def test_upcycling_keeps_the_shared_expert():
    torch.manual_seed(0)
    dense = dn.create_model("moe_convnet_mnist", num_experts=1, top_k=1, hidden=8, shared_hidden=8,
                            widths=(4, 8, 8)).eval()
    moe = upcycle(dense, num_experts=4, top_k=1, seed=0).eval()
    x = dense.example_input(3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(x, mode="execute").logits, dense(x, mode="execute").logits,
                                   rtol=1e-5, atol=1e-5)
    for a, b in zip(moe.moe_layers(), dense.moe_layers(), strict=True):
        assert torch.equal(a.shared.down.weight, b.shared.down.weight)
