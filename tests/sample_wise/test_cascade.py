"""Cascade-specific checks: member costs, later members only see the samples passed on, building from modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynaneural.compute.flops import count_flops
from dynaneural.registry import create_model
from dynaneural.sample_wise.early_exit.cascade import build_cascade


def _members(n_stages: tuple[int, ...] = (1, 2, 3), exits: str = "last") -> list[nn.Module]:
    torch.manual_seed(0)
    return [create_model("test_exit_convnet", num_stages=n, exits=exits) for n in n_stages]


def test_cost_profile_is_the_members_costs() -> None:
    members = _members()
    model = create_model("test_cascade")
    profile = model.cost_profile()
    assert profile.stage == (0.0, 0.0, 0.0)
    assert profile.head == tuple(m.cost_profile().static_total for m in members)
    torch.testing.assert_close(profile.path_costs([True] * 3),
                               torch.tensor(profile.head, dtype=torch.float64).cumsum(0))
    assert model.config["members"][0] == {"name": "test_exit_convnet", "kwargs": {"num_stages": 1, "exits": "last",
                                                                                   "num_classes": 10}}


def test_later_members_only_see_samples_passed_on() -> None:
    torch.manual_seed(0)
    model = create_model("test_cascade").eval()
    seen: list[int] = [0, 0, 0]
    for k, head in enumerate(model.heads):
        head.register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, seen[k] + inp[0].shape[0]))
    x = 3.0 * torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        scores = model(x, mode="simulate", thresholds=[2.0, 2.0, 2.0]).exit_scores
        seen[:] = [0, 0, 0]
        thr = [float(scores[:, 0].median()), float(scores[:, 1].median()), 0.0]
        out = model(x, mode="execute", thresholds=thr)
    counts = torch.bincount(out.exit_index, minlength=3).tolist()
    assert min(counts) > 0
    assert seen == [64, 64 - counts[0], counts[2]]


def test_multi_exit_members_run_as_their_static_twin() -> None:
    members = _members((1, 3), exits="all")  # members with intermediate exits of their own
    model = build_cascade(members).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.heads[1](x), members[1].to_static()(x))
    intermediate = {id(p) for h in members[1].heads[:-1] for p in h.parameters()}
    assert not intermediate & {id(p) for p in model.parameters()}
    assert model.cost_profile().head[1] == members[1].cost_profile().static_total


def test_plain_modules_and_flops() -> None:
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    large = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = build_cascade([small, large], num_classes=10, input_shape=(1, 8, 8))
    assert model.cost_profile().head == (640.0, 64 * 32 + 32 * 10)
    assert count_flops(model.to_static(), torch.zeros(1, 1, 8, 8)).total == 64 * 32 + 32 * 10


def test_mnist_variant() -> None:
    model = create_model("cascade_mnist")
    large = create_model("exit_convnet_mnist", exits="last")
    small = create_model("exit_convnet_mnist", num_stages=2, exits="last")
    profile = model.cost_profile()
    assert model.num_exits == 2 and model.input_shape == (1, 28, 28)
    assert profile.head == (small.cost_profile().static_total, large.cost_profile().static_total)
    assert profile.static_total == large.cost_profile().static_total


@pytest.mark.parametrize("models, kwargs, match", [
    (lambda: _members((1,)), {}, "at least two"),
    (lambda: _members((1, 2)), dict(num_classes=5), "num_classes"),
    (lambda: [nn.Flatten(), nn.Flatten()], dict(num_classes=10), "input shape"),
    (lambda: [nn.Sequential(nn.Flatten(), nn.Linear(64, 3))] * 2, dict(num_classes=10, input_shape=(1, 8, 8)),
     "member 0 must return"),
])
def test_build_errors(models, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_cascade(models(), **kwargs)


def test_build_leaves_member_modes_alone() -> None:
    members = [m.eval() for m in _members((1, 2))]
    build_cascade(members)
    assert not any(m.training for member in members for m in member.modules())


def test_built_under_inference_mode_runs_and_reconfigures() -> None:
    """A cascade built (and calibrated) inside ``torch.inference_mode()`` must still run, and take new thresholds,
    outside it: its threshold buffer is a normal tensor, not an inference tensor without a version counter."""
    members = _members((1, 2))
    x = 3.0 * torch.randn(16, 1, 8, 8)
    with torch.inference_mode():
        model = build_cascade(members).eval()
        model.configure_exits(rule="confidence", thresholds=[0.5, float("-inf")])
        inside = model(x, mode="execute").exit_index
    assert not model.exit_thresholds.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(model(x, mode="execute").exit_index, inside)
        model.configure_exits(rule="confidence", thresholds=[0.0, float("-inf")])  # every sample exits first
        assert (model(x, mode="execute").exit_index == 0).all()
