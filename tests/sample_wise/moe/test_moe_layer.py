"""Focused tests of the MoE feed-forward layer: dispatch against a naive per-token loop, capacity and dropped
tokens, dropless mode, expert choice, auxiliary losses against hand computations, gradients and the ledger."""

import math

import pytest
import torch
import torch.nn.functional as F

import dynaneural as dn
from dynaneural.sample_wise.moe import DenseMixtureFFN, MoEFeedForward, load_balancing_loss, router_z_loss


def _expert(m, e, x):
    """SwiGLU expert e on rows x, written out from the stacked weights."""
    gate = x @ m.w_gate_up[e, :m.hidden].T
    up = x @ m.w_gate_up[e, m.hidden:].T
    return (F.silu(gate) * up) @ m.w_down[e].T


def _naive_top_k(m, x, kept=None):
    """Python loop over tokens: softmax router, top-k, (renormalised) weights, experts one token at a time."""
    probs = (x @ m.router.weight.T).softmax(-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        w, idx = probs[n].topk(m.top_k)
        if m.normalize_weights:
            w = w / w.sum()
        for j in range(m.top_k):
            if kept is not None and not kept[n, j]:
                continue
            out[n] += w[j] * _expert(m, int(idx[j]), x[n:n + 1])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("row_block", [None, 3])
@pytest.mark.parametrize("mode", ["execute", "simulate", "train"])
def test_dispatch_equals_naive_per_token_reference(top_k, row_block, mode):
    m = MoEFeedForward(12, 20, 5, top_k=top_k, row_block=row_block)
    x = torch.randn(37, 12)
    with torch.no_grad():
        res = m(x, mode=mode)
        ref = _naive_top_k(m, x)
    torch.testing.assert_close(res.output, ref, rtol=1e-5, atol=1e-5)
    assert res.routing.dropped == 0
    assert sum(res.routing.counts) == 37 * top_k
    assert res.router_logits.shape == (37, 5)


def test_top1_uses_raw_probability_top2_renormalises():
    assert not MoEFeedForward(4, 4, 4, top_k=1).normalize_weights  # Switch
    assert MoEFeedForward(4, 4, 4, top_k=2).normalize_weights  # Mixtral
    m = MoEFeedForward(4, 4, 4, top_k=1)
    x = torch.randn(6, 4)
    r = m.route(x)
    probs = (x @ m.router.weight.T).softmax(-1)
    torch.testing.assert_close(r.weight.sort().values, probs.max(-1).values.sort().values)


def _all_to_expert_zero(m, second=1):
    """Router that sends every token to expert 0 first and expert ``second`` second (positive inputs)."""
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 2.0
        m.router.weight[second] = 1.0


def test_capacity_drops_by_gshard_priority():
    # 8 tokens in one group, 4 experts, top-2, capacity factor 1 → C = ceil(1 · 8 · 2 / 4) = 4 per expert.
    m = MoEFeedForward(4, 8, 4, top_k=2, capacity_factor=1.0)
    _all_to_expert_zero(m)
    x = torch.rand(8, 4) + 0.1
    with torch.no_grad():
        res = m(x, mode="execute")
        sim = m(x, mode="simulate")
    r = res.routing
    assert r.counts == [4, 4, 0, 0]  # expert 0 takes the first 4 tokens' first choices, expert 1 likewise
    assert r.dropped == 8
    expected = torch.tensor([[0, 1]] * 4 + [[-1, -1]] * 4)
    torch.testing.assert_close(r.topk_index, expected)
    # Dropped tokens get a zero output (they pass through on the residual of the blocks).
    assert torch.all(res.output[4:] == 0)
    kept = expected >= 0
    torch.testing.assert_close(res.output, _naive_top_k(m, x, kept), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sim.output, res.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.token_flops, torch.tensor([m.router_flops() + 2.0 * m.expert_flops()] * 4
                                                             + [float(m.router_flops())] * 4, dtype=torch.float64))


def test_first_choices_served_before_second_choices():
    # Tokens 0-3 choose (0, 1); tokens 4-7 choose (1, 0). C = ceil(0.5 · 8 · 2 / 4) = 2.
    m = MoEFeedForward(2, 4, 4, top_k=2, capacity_factor=0.5)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = torch.tensor([2.0, 1.0])
        m.router.weight[1] = torch.tensor([1.0, 2.0])
    x = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(4, 1), torch.tensor([[0.0, 1.0]]).repeat(4, 1)])
    r = m.route(x)
    # Expert 0: first choices of tokens 0, 1 win over token 4's second choice; expert 1: tokens 4, 5.
    expected = torch.tensor([[0, -1], [0, -1], [-1, -1], [-1, -1], [1, -1], [1, -1], [-1, -1], [-1, -1]])
    torch.testing.assert_close(r.topk_index, expected)
    assert r.dropped == 12


def test_capacity_is_per_routing_group():
    m = MoEFeedForward(4, 8, 4, top_k=1, capacity_factor=1.0, group_size=4)  # C = 1 per group
    _all_to_expert_zero(m)
    x = torch.rand(12, 4) + 0.1
    r = m.route(x)
    assert r.counts[0] == 3  # one per group
    kept_tokens = sorted(r.token.tolist())
    assert kept_tokens == [0, 4, 8]


def test_dropless_never_drops():
    m = MoEFeedForward(4, 8, 4, top_k=2, capacity_factor=None)
    _all_to_expert_zero(m)
    x = torch.rand(50, 4) + 0.1
    with torch.no_grad():
        res = m(x, mode="execute")
    assert res.routing.dropped == 0 and res.routing.counts == [50, 50, 0, 0]
    torch.testing.assert_close(res.output, _naive_top_k(m, x), rtol=1e-5, atol=1e-6)
    # A capacity large enough for every token is dropless too.
    m.capacity_factor = 10.0
    assert m.route(x).dropped == 0


def test_load_balancing_loss_against_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]])
    probs = logits.softmax(-1)
    counts = torch.tensor([2, 1, 1])  # top-1 argmax of each token
    f = [2 / 4, 1 / 4, 1 / 4]
    p = probs.mean(0).tolist()
    hand = 3 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    torch.testing.assert_close(load_balancing_loss(probs, counts, 4), torch.tensor(hand))
    # Perfect balance gives 1.
    uniform = torch.full((6, 3), 1 / 3)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([2, 2, 2]), 6), torch.tensor(1.0))


def test_layer_aux_losses_match_formulas():
    m = MoEFeedForward(6, 8, 4, top_k=2, balance_coef=0.5, z_coef=0.25)
    x = torch.randn(20, 6)
    res = m(x, mode="train")
    logits = x @ m.router.weight.T
    probs = logits.softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    f = torch.bincount(idx.flatten(), minlength=4).float() / (20 * 2)
    hand_balance = 4 * (f * probs.mean(0)).sum()
    hand_z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(res.aux_losses["moe_balance"], 0.5 * hand_balance)
    torch.testing.assert_close(res.aux_losses["moe_z"], 0.25 * hand_z)
    torch.testing.assert_close(router_z_loss(logits), hand_z)
    assert res.aux_losses["moe_balance"].requires_grad  # through P (the router probabilities)
    with torch.no_grad():
        assert m(x, mode="execute").aux_losses == {}  # inference does not pay for them
        assert set(m(x, mode="execute", return_aux=True).aux_losses) == {"moe_balance", "moe_z"}


def test_balance_loss_times_k_equals_hf_mixtral_formula():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    m = MoEFeedForward(6, 8, 4, top_k=2, balance_coef=1.0)
    x = torch.randn(20, 6)
    res = m(x, mode="train")
    hf = load_balancing_loss_func((res.router_logits,), 4, 2)
    torch.testing.assert_close(2 * res.aux_losses["moe_balance"], hf)
    assert transformers


def test_expert_choice_takes_top_c_tokens_per_expert_per_group():
    m = MoEFeedForward(8, 8, 4, top_k=2, routing="expert_choice", group_size=6)  # C = round(2 · 6 / 4) = 3
    x = torch.randn(18, 8)
    with torch.no_grad():
        res = m(x, mode="execute")
        sim = m(x, mode="simulate")
    r = res.routing
    assert r.counts == [9, 9, 9, 9]
    probs = (x @ m.router.weight.T).softmax(-1).view(3, 6, 4)
    for g in range(3):
        for e in range(4):
            chosen = set(r.token[(r.expert == e) & (r.token // 6 == g)].tolist())
            assert chosen == set((probs[g, :, e].topk(3).indices + 6 * g).tolist())
    ref = torch.zeros_like(x)
    for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist(), strict=True):
        ref[t] += w * _expert(m, e, x[t:t + 1])[0]
    torch.testing.assert_close(res.output, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sim.output, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.experts_per_token.sum(), torch.tensor(36))
    expected = m.router_flops() + r.experts_per_token.double() * m.expert_flops()
    torch.testing.assert_close(res.token_flops, expected)
    assert "moe_balance" not in m(x, mode="train").aux_losses  # balanced by construction


def test_train_gradients_equal_dense_reference_gradients():
    """The sorted dispatch's gradients (router through the gate weights, experts through their slices, the shared
    expert) equal those of the simulate path, which computes every expert densely and masks."""
    torch.manual_seed(1)
    for kwargs in (dict(top_k=2), dict(top_k=1, capacity_factor=0.6), dict(routing="expert_choice"),
                   dict(top_k=1, capacity_factor=0.6, group_size=16, shared_hidden=9)):
        m = MoEFeedForward(6, 10, 4, **kwargs)
        x = torch.randn(16, 6, requires_grad=True)
        target = torch.randn(16, 6)
        grads = []
        for mode in ("train", "simulate"):
            m.zero_grad()
            x.grad = None
            out = m(x, mode=mode)
            loss = ((out.output - target) ** 2).sum() + sum(out.aux_losses.values())
            loss.backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert m.router.weight.grad.abs().sum() > 0
        if m.shared is not None:  # the shared expert (DeepSeekMoE) is trained through the same loss
            assert m.shared.gate_up.weight.grad.abs().sum() > 0 and m.shared.down.weight.grad.abs().sum() > 0


def test_all_experts_equals_dense_mixture():
    m = MoEFeedForward(6, 10, 4, top_k=2)
    x = torch.randn(9, 6)
    with torch.no_grad():
        m.set_all_on(True)
        out = m(x, mode="execute")
        m.set_all_on(False)
        ref = DenseMixtureFFN(m)(x)
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.token_flops, torch.full((9,), float(6 * 4 + 4 * 3 * 6 * 10), dtype=torch.float64))
    # top-k = E (a layer built that way) is the same dense mixture.
    full = MoEFeedForward(6, 10, 4, top_k=4)
    full.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(full(x).output, ref, rtol=1e-5, atol=1e-5)


def test_three_dim_input_and_bad_inputs():
    m = MoEFeedForward(6, 10, 4, top_k=2, group_size=5)
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        assert m(x).output.shape == (3, 5, 6)
        with pytest.raises(ValueError, match="width"):
            m(torch.randn(3, 5, 7))
        with pytest.raises(ValueError, match="groups"):
            m(torch.randn(7, 6))
        with pytest.raises(ValueError, match="empty"):
            m(torch.randn(0, 6))
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(6, 10, 4, top_k=5)
    with pytest.raises(ValueError, match="routing"):
        MoEFeedForward(6, 10, 4, routing="hash")
    with pytest.raises(ValueError, match="capacity"):
        MoEFeedForward(6, 10, 4, capacity_factor=0)


def test_model_ledger_adds_dense_parts_and_routed_experts():
    model = dn.create_model("test_moe_transformer").eval()
    x = model.example_input(5, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = model(x, mode="execute")
    moe = model.blocks[0].moe
    used = (out.decisions["moe0/experts"] >= 0).sum(1).double()
    expected = model._dense_flops + model.num_tokens * moe.router_flops() + used * moe.expert_flops()
    torch.testing.assert_close(out.cost, expected, rtol=1e-12, atol=0)
    assert (out.decisions["moe_dropped"] > 0).any()  # capacity 1 per sample drops some tokens
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (5, model.num_tokens, 4)
    assert out.tokens_per_expert.shape == (1, 4)


def test_patch_transformer_routes_per_sample():
    """Capacity is decided per sample: a sample's output does not depend on the rest of the batch."""
    model = dn.create_model("moe_transformer_mnist", capacity_factor=1.0, dim=32, hidden=32, depth=1).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        full = model(x)
        part = model(x[2:4])
    torch.testing.assert_close(part.logits, full.logits[2:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.cost, full.cost[2:4])


def test_mlp_trains_on_digits():
    """A few steps of the library's trainer on the MoE MLP lower the loss and use more than one expert."""
    from dynaneural.data import load_dataset
    from dynaneural.engine import TrainConfig, train

    data = load_dataset("digits")
    model = dn.create_model("moe_mlp_digits", dim=32, hidden=32)
    res = train(model, train_x=data.train_x[:512], train_y=data.train_y[:512],
                config=TrainConfig(epochs=3, batch_size=64, lr=3e-3, optimizer="adamw", progress=False,
                                   device="cpu"))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert "train/aux/moe_balance" in res.history[-1]
    with torch.inference_mode():
        out = model.eval()(data.val_x)
    assert (out.tokens_per_expert > 0).sum() >= 2
    assert math.isfinite(float(out.cost.mean()))
