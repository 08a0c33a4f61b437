"""Focused tests of RANet: each sub-network reads a lower resolution and reuses the coarser features."""

import torch

import dynaneural as dn
from dynaneural.compute.flops import static_flops


def test_stages_see_increasing_resolutions_and_reuse_features():
    model = dn.create_model("ranet_mnist").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        s0 = model.stages[0](x)
        s1 = model.stages[1](s0)
        assert s0[1].shape[-1] == 7 and s1[1].shape[-1] == 14
        # the 14×14 sub-network's output depends on the 7×7 features (feature reuse)
        other = model.stages[1]([x, torch.zeros_like(s0[1])])
        assert not torch.allclose(other[1], s1[1])


def test_low_resolution_exit_is_cheap():
    model = dn.create_model("ranet_mnist")
    prof = model.cost_profile()
    cum = torch.tensor(prof.stage).cumsum(0)
    assert cum[0] < 0.15 * cum[-1] and cum[1] < 0.5 * cum[-1]


def test_static_family_member_is_a_truncated_ranet():
    small = dn.create_model("ranet_mnist", num_stages=2, exits="last").eval()
    x = torch.randn(1, 1, 28, 28)
    assert small.num_exits == 1
    assert static_flops(small.to_static(), x) == small.cost_profile().static_total

