"""The multi-exit ViT: its layout, its static family, its FLOPs per block and its refusals."""

from __future__ import annotations

import pytest
import torch

from dynaneural.compute.flops import count_flops
from dynaneural.registry import create_model
from dynaneural.sample_wise.early_exit.exit_vit import ExitViTConfig


def test_one_exit_per_block_and_equal_block_costs() -> None:
    model = create_model("exit_vit_mnist", dim=32, heads=2, depth=4)
    assert model.num_exits == 4 and model.exit_stage == (0, 1, 2, 3)
    prof = model.cost_profile()
    # Every block after the first is one identical transformer block: the same FLOPs.
    assert len(set(prof.stage[1:])) == 1
    tokens, d, hidden = 50, 32, 128
    block = tokens * (3 * d * d + d * d + 2 * d * hidden) + 2 * tokens * tokens * d  # MACs
    assert prof.stage[1] == pytest.approx(block, rel=0.03)  # plus norms and activations, ~2 %
    assert all(h < 0.01 * prof.stage[1] for h in prof.head)  # an exit reads the class token only


def test_static_family_truncates_blocks() -> None:
    full = create_model("exit_vit_mnist", dim=32, heads=2, depth=4, exits="last")
    half = create_model("exit_vit_mnist", dim=32, heads=2, depth=4, exits="last", num_stages=2)
    assert full.num_exits == half.num_exits == 1
    assert len(half.stages) == 2
    x = torch.randn(3, 1, 28, 28)
    f_full = count_flops(full.to_static().eval(), x).total
    f_half = count_flops(half.to_static().eval(), x).total
    assert f_half < f_full
    assert full(x, mode="execute").logits.shape == (3, 10)


def test_exit_heads_read_only_the_class_token() -> None:
    model = create_model("test_exit_vit").eval()
    tokens = torch.randn(2, 17, 16)
    changed = tokens.clone()
    changed[:, 1:] = torch.randn(2, 16, 16)
    head = model.heads[0]
    torch.testing.assert_close(head(tokens), head(changed))


@pytest.mark.parametrize("bad", [dict(num_stages=0), dict(num_stages=7), dict(exits="some")])
def test_bad_settings_fail_loudly(bad: dict) -> None:
    with pytest.raises(ValueError):
        ExitViTConfig(**bad)


@pytest.mark.parametrize("bad", [dict(heads=5), dict(stem="pyramid"), dict(depth=0)])
def test_bad_backbone_settings_fail_loudly(bad: dict) -> None:
    with pytest.raises(ValueError):
        create_model("exit_vit_mnist", **bad)
