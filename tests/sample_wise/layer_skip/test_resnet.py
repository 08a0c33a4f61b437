"""The CIFAR ResNet backbone of the layer-skipping methods: shapes, analytic FLOPs, pooling."""

import pytest
import torch

from dynaneural.compute.flops import static_flops
from dynaneural.layers.resnet import AvgPoolTo, CifarResNet, CifarResNetConfig, block_costs


def test_resnet20_layout_and_flops():
    net = CifarResNet(CifarResNetConfig()).eval()
    assert net.config.depth == 20 and len(net.blocks) == 9
    assert [b.is_identity_shape for b in net.blocks] == [True, True, True, False, True, True, False, True, True]
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    costs = block_costs(net)
    assert costs.total == pytest.approx(static_flops(net, x[:1]), rel=1e-12)
    # He et al.'s ResNet-20 is ~41 M multiply-accumulates (convolutions) plus batch norm and the head
    assert 40e6 < costs.total < 43e6
    assert costs.block_inputs[0] == (16, 32, 32) and costs.block_inputs[-1] == (64, 8, 8)


@pytest.mark.parametrize("size,hw", [(1, 8), (2, 8), (2, 7), (4, 28)])
def test_avg_pool_to_matches_adaptive_pooling(size, hw):
    x = torch.randn(3, 5, hw, hw)
    torch.testing.assert_close(AvgPoolTo(size)(x), torch.nn.AdaptiveAvgPool2d(size)(x))
    assert static_flops(torch.nn.Sequential(AvgPoolTo(size)), x[:1]) == 5 * hw * hw


def test_config_validation():
    with pytest.raises(ValueError, match="blocks_per_stage"):
        CifarResNetConfig(blocks_per_stage=0)
    with pytest.raises(ValueError, match="too small"):
        CifarResNetConfig(input_size=2, widths=(4, 8, 16))
