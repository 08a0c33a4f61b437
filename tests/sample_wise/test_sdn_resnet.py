"""SDN ResNet-specific checks: IC placement, the feature reduction's FLOPs and gradient, the static ResNet."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dynaneural.compute.flops import count_flops
from dynaneural.registry import create_model
from dynaneural.sample_wise.early_exit.sdn_resnet import InternalClassifier, SDNResNetConfig, sdn_exit_blocks


@pytest.mark.parametrize("num_blocks, expected", [
    (1, ()),
    (3, (0, 1)),
    (9, (0, 2, 3, 4, 6, 7)),  # ResNet-20
    (27, (3, 7, 11, 15, 19, 23)),  # ResNet-56, SDN's network: ICs at ≈15 %, 30 %, ..., 90 % of the blocks
])
def test_sdn_exit_placement(num_blocks: int, expected: tuple[int, ...]) -> None:
    assert sdn_exit_blocks(num_blocks) == expected


def test_cifar_variant_layout() -> None:
    model = create_model("sdn_resnet_cifar")
    assert model.num_exits == 7 and len(model.stages) == 7
    assert sum(isinstance(m, InternalClassifier) for m in model.heads) == 6
    static = create_model("sdn_resnet_cifar", exits="last")
    assert static.num_exits == 1
    convs3 = [m for m in static.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 6 * 3 + 1  # ResNet-20: 19 3×3 convs + the final linear layer
    assert static.cost_profile().static_total == pytest.approx(model.cost_profile().static_total)


def test_internal_classifier_flops_and_mixing_gradient() -> None:
    ic = InternalClassifier(16, 10, pool=4).eval()
    x = torch.randn(2, 16, 32, 32)
    expected = 16 * 32 * 32 + 16 * 4 * 4 * 10  # average pool reads every element; max pool and the mix are free
    assert count_flops(ic, x).total == expected  # strict: every parameterised leaf is accounted for
    fvcore_nn = pytest.importorskip("fvcore.nn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = fvcore_nn.FlopCountAnalysis(ic, (x[:1],))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        assert analysis.total() == expected
    ic.train()
    ic(x).sum().backward()
    assert ic.reduce.mix.alpha.grad is not None and ic.reduce.mix.alpha.grad.abs() > 0


def test_ic_pool_shrinks_on_small_maps() -> None:
    model = create_model("test_sdn_resnet")  # 8×8 input: block maps 8, 4, 2; ic_pool 2
    ic = model.heads[0]
    assert isinstance(ic, InternalClassifier) and ic.fc.in_features == 4 * 2 * 2


def test_explicit_exit_blocks() -> None:
    model = create_model("test_sdn_resnet", exit_blocks=(1,))
    assert model.num_exits == 2 and model.exit_stage == (0, 1)


@pytest.mark.parametrize("kwargs", [dict(exit_blocks=(8,)), dict(exit_blocks=(3, 1)), dict(blocks_per_group=0),
                                    dict(exits="none")])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SDNResNetConfig(**kwargs)
