"""Contract tests for the multi-exit models of this package (MSDNet, SDN ResNet, cascade, multi-exit ViT), on their tiny variants.

For each model: training forward/backward; simulate and execute agree (exits, per-sample costs, logits) under
thresholds that send samples to several exits; batched and one-at-a-time execution agree; with its exits disabled
the network is its static twin; every sample pays exactly its path cost; the static FLOPs agree with fvcore.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynaneural.compute.flops import count_flops
from dynaneural.registry import create_model
from dynaneural.sample_wise.early_exit import (  # noqa: F401  (registers the models)
    cascade,
    exit_convnet,
    exit_vit,
    msdnet,
    sdn_resnet,
)
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

MODELS = ["test_msdnet", "test_sdn_resnet", "test_cascade", "test_exit_vit"]
RULES = ["confidence", "entropy", "learned"]


def _build(name: str, **kwargs: object) -> MultiExitNetwork:
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    assert isinstance(model, MultiExitNetwork)
    return model.eval()


def _batch(model: MultiExitNetwork, n: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn((n, *model.input_shape), generator=g)


def _spread_thresholds(model: MultiExitNetwork, x: torch.Tensor, rule: str, seed: int = 0) -> torch.Tensor:
    """Random thresholds that send samples out at every exit: each intermediate exit fires for a random 30-60 % of
    the samples' scores, the threshold sitting in the widest gap there so that rounding cannot flip a decision."""
    k = model.num_exits
    never = torch.full((k,), 2.0)  # scores of these rules lie in [0, 1]: every exit enabled, none fires early
    with torch.no_grad():
        scores = model(x, mode="simulate", rule=rule, thresholds=never).exit_scores
    assert scores is not None
    g = torch.Generator().manual_seed(seed)
    thr = torch.full((k,), float("-inf"))
    for j in range(k - 1):
        s = scores[:, j].sort().values
        lo = int(len(s) * (0.4 + 0.3 * torch.rand((), generator=g)))
        window = slice(lo, lo + len(s) // 5)
        gaps = s[1:][window] - s[:-1][window]
        i = lo + int(gaps.argmax())
        thr[j] = 0.5 * (s[i] + s[i + 1])
    return thr


def _rows(state: object) -> int:
    """Rows of a stage's output: a tensor, or a list of tensors (MSDNet's scales)."""
    while not isinstance(state, torch.Tensor):
        state = state[-1]  # type: ignore[index]
    return state.shape[0]


def _settings(name: str, rule: str) -> tuple[MultiExitNetwork, torch.Tensor, torch.Tensor]:
    model = _build(name, exit_policy=rule == "learned")
    x = _batch(model)
    return model, x, _spread_thresholds(model, x, rule)


@pytest.mark.parametrize("name", MODELS)
def test_train_forward_backward(name: str) -> None:
    model = _build(name).train()
    x = _batch(model, 8)
    y = torch.randint(0, model.num_classes, (8,))
    out = model(x)
    assert out.exit_logits is not None and len(out.exit_logits) == model.num_exits
    assert all(t.shape == (8, model.num_classes) for t in out.exit_logits)
    loss = sum(F.cross_entropy(t, y) for t in out.exit_logits)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", MODELS)
def test_simulate_matches_execute(name: str, rule: str) -> None:
    model, x, thr = _settings(name, rule)
    with torch.no_grad():
        sim = model(x, mode="simulate", rule=rule, thresholds=thr)
        exe = model(x, mode="execute", rule=rule, thresholds=thr)
    assert set(sim.exit_index.tolist()) == set(range(model.num_exits)), "thresholds should use every exit"
    torch.testing.assert_close(exe.exit_index, sim.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(exe.cost, sim.cost, rtol=0, atol=0)
    torch.testing.assert_close(exe.logits, sim.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 7, 64])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", [*MODELS, "test_exit_convnet"])
def test_streamed_execution_matches_execute(name: str, rule: str, slots: int) -> None:
    model, x, thr = _settings(name, rule)
    calls: list[int] = []
    hook = model.stages[-1].register_forward_hook(lambda mod, i, o: calls.append(_rows(o)))
    with torch.no_grad():
        exe = model(x, mode="execute", rule=rule, thresholds=thr)
        calls.clear()
        got = model(x, mode="execute", rule=rule, thresholds=thr, slots=slots)
    hook.remove()
    torch.testing.assert_close(got.exit_index, exe.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(got.cost, exe.cost, rtol=0, atol=0)
    torch.testing.assert_close(got.logits, exe.logits, rtol=0, atol=1e-5)
    # The last stage ran each input that reached it once, in sub-batches of at most `slots`, all full but the last.
    reached = int((exe.exit_index == model.num_exits - 1).sum())
    assert sum(calls) == reached and all(c <= slots for c in calls)
    assert all(c == slots for c in calls[:-1])


def test_streamed_execution_queues_rows_until_a_full_batch() -> None:
    """A stream of 5 batches: plain execution runs the last stage once per batch on its few survivors; streamed
    execution queues them and runs the last stage on full batches."""
    model, x, thr = _settings("test_sdn_resnet", "confidence")
    x = x.repeat(5, 1, 1, 1)
    plain: list[int] = []
    streamed: list[int] = []
    hook = model.stages[-1].register_forward_hook(lambda mod, i, o: plain.append(_rows(o)))
    with torch.no_grad():
        for i in range(0, len(x), 48):
            model(x[i:i + 48], mode="execute", thresholds=thr)
        hook.remove()
        hook = model.stages[-1].register_forward_hook(lambda mod, i, o: streamed.append(_rows(o)))
        model(x, mode="execute", thresholds=thr, slots=48)
    hook.remove()
    assert sum(plain) == sum(streamed) and len(streamed) < len(plain)
    assert all(c == 48 for c in streamed[:-1]) and max(plain) < 48


def test_streamed_execution_rejects_what_it_cannot_do() -> None:
    model, x, thr = _settings("test_msdnet", "confidence")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="slots"):
            model(x, mode="execute", slots=bad)
    with pytest.raises(ValueError, match="execute mode"):
        model(x, mode="simulate", slots=4)
    with pytest.raises(ValueError, match="max_seconds"):
        model(x, mode="execute", slots=4, max_seconds=1.0)


@pytest.mark.parametrize("name", MODELS)
def test_batched_matches_one_at_a_time(name: str) -> None:
    model, x, thr = _settings(name, "confidence")
    with torch.no_grad():
        batched = model(x, mode="execute", thresholds=thr)
        single = [model(x[i: i + 1], mode="execute", thresholds=thr) for i in range(len(x))]
    torch.testing.assert_close(batched.logits, torch.cat([o.logits for o in single]), rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.exit_index, torch.cat([o.exit_index for o in single]), rtol=0, atol=0)
    torch.testing.assert_close(batched.cost, torch.cat([o.cost for o in single]), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_disabled_exits_is_static_twin(name: str) -> None:
    model = _build(name)
    x = _batch(model)
    model.disable_exits()
    with torch.no_grad():
        out = model(x)
        static = model.to_static()(x)
    torch.testing.assert_close(out.logits, static, rtol=0, atol=1e-5)
    assert (out.exit_index == model.num_exits - 1).all()
    assert torch.all(out.cost == model.cost_profile().static_total)


@pytest.mark.parametrize("name", MODELS)
def test_execute_cost_is_path_cost_within_static_bound(name: str) -> None:
    model, x, thr = _settings(name, "confidence")
    with torch.no_grad():
        out = model(x, mode="execute", thresholds=thr)
    profile = model.cost_profile()
    path = profile.path_costs(thr != float("inf"))
    torch.testing.assert_close(out.cost, path[out.exit_index], rtol=0, atol=0)
    assert float(out.cost.max()) <= float(path.max()) == float(path[-1])  # the full path: every stage and head
    assert float(out.cost.min()) >= float(path[0]) > 0
    # With only the final exit the bound is the static twin's cost.
    assert profile.static_total == pytest.approx(sum(profile.stage) + profile.head[-1])


@pytest.mark.parametrize("name", MODELS)
def test_static_flops_match_fvcore(name: str, fvcore_macs) -> None:
    model = _build(name)
    static = model.to_static().eval()
    x = _batch(model, 1)
    reference = fvcore_macs(static, x)
    ours = model.cost_profile().static_total
    assert ours == pytest.approx(reference, rel=0.01)
    assert count_flops(static, x).total == pytest.approx(ours)
