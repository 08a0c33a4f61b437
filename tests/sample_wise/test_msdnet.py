"""MSDNet-specific checks: the multi-scale state, scale pruning, truncation, config validation, variant budgets."""

from __future__ import annotations

import pytest
import torch

from dynaneural.registry import create_model
from dynaneural.sample_wise.early_exit.msdnet import MSDClassifier, MSDLayer, MSDNetConfig, build_msdnet


def _state_shapes(model: torch.nn.Module, x: torch.Tensor) -> list[list[tuple[int, ...]]]:
    shapes, h = [], x
    with torch.no_grad():
        for stage in model.stages:
            h = stage(h)
            shapes.append([tuple(t.shape) for t in h])
    return shapes


def test_state_is_a_list_of_scales_and_the_finest_is_dropped() -> None:
    model = create_model("test_msdnet").eval()
    shapes = _state_shapes(model, torch.zeros(2, 1, 8, 8))
    # stem 4 (+2 per layer) at 8×8, ×2 channels at 4×4; layer 3 drops scale 1, then a transition halves 10 -> 5.
    assert shapes == [[(2, 6, 8, 8), (2, 12, 4, 4)], [(2, 8, 8, 8), (2, 16, 4, 4)], [(2, 10, 4, 4)]]


def test_cifar_variant_scale_schedule() -> None:
    model = create_model("msdnet_cifar").eval()
    shapes = _state_shapes(model, torch.zeros(1, 3, 32, 32))
    # 6 layers on 3 scales: the finest scale is dropped every ceil(6 / 3) = 2 layers.
    assert [[s[-1] for s in stage] for stage in shapes] == [[32, 16, 8], [32, 16, 8], [16, 8], [16, 8], [8], [8]]


def test_layer_grows_each_scale_by_regular_and_strided_halves() -> None:
    layer = MSDLayer([4, 8], growth=[2, 4], bn_factor=[1, 2], out_scales=2)
    finest, coarse = layer.updates
    assert finest.down is None  # nothing finer to read
    assert coarse.down is not None and coarse.regular[-1][0].out_channels == coarse.down[-1][0].out_channels == 2
    out = layer([torch.zeros(3, 4, 8, 8), torch.zeros(3, 8, 4, 4)])
    assert [tuple(t.shape) for t in out] == [(3, 6, 8, 8), (3, 12, 4, 4)]
    dropped = MSDLayer([4, 8], growth=[2, 4], bn_factor=[1, 2], out_scales=1)
    assert [tuple(t.shape) for t in dropped([torch.zeros(3, 4, 8, 8), torch.zeros(3, 8, 4, 4)])] == [(3, 12, 4, 4)]


def test_classifier_reads_the_coarsest_scale() -> None:
    head = MSDClassifier(8, 5, width=4, num_convs=2).eval()
    out = head([torch.zeros(2, 3, 16, 16), torch.randn(2, 8, 8, 8)])
    assert out.shape == (2, 5)


def test_truncated_static_baseline_skips_dead_scales() -> None:
    full = create_model("test_msdnet")
    static = create_model("test_msdnet", num_blocks=2, exits="last")
    assert static.num_exits == 1 and len(static.stages) == 2
    shapes = _state_shapes(static.eval(), torch.zeros(1, 1, 8, 8))
    assert len(shapes[-1]) == 1  # the last layer computes only what the classifier reads
    fp, sp = full.cost_profile(), static.cost_profile()
    assert sp.static_total < fp.stage[0] + fp.stage[1] + fp.head[1]
    assert sp.stage[0] == fp.stage[0]  # the prefix before the last layer is the same design


@pytest.mark.parametrize("kwargs, match", [
    (dict(growth=3, gr_factor=(1, 1, 1)), "even"),
    (dict(gr_factor=(1, 2)), "one entry per scale"),
    (dict(num_blocks=9), "num_blocks"),
    (dict(block_layers=()), "block_layers"),
    (dict(reduction=0.0), "reduction"),
    (dict(exits="some"), "exits"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MSDNetConfig(**kwargs)


def test_entry_points_reject_unknown_arguments() -> None:
    with pytest.raises(TypeError):
        create_model("msdnet_cifar", grwoth=4)


@pytest.mark.parametrize("name, shape, exits, mflops", [
    ("msdnet_digits", (1, 8, 8), (4, 4), (0.1, 2.0)),
    ("msdnet_mnist", (1, 28, 28), (4, 6), (5.0, 20.0)),
    ("msdnet_cifar", (3, 32, 32), (5, 7), (15.0, 60.0)),
])
def test_variant_budgets(name: str, shape: tuple[int, ...], exits: tuple[int, int], mflops: tuple[float, float]
                         ) -> None:
    model = create_model(name)
    profile = model.cost_profile()
    assert model.input_shape == shape
    assert exits[0] <= model.num_exits <= exits[1]
    assert mflops[0] <= profile.static_total / 1e6 <= mflops[1]
    assert len(profile.stage) == model.num_exits  # one stage per block, an exit after each
    assert create_model(name, exits="last").num_exits == 1


def test_build_from_config_records_it() -> None:
    cfg = MSDNetConfig(in_chans=1, input_size=8, num_scales=2, stem_channels=4, growth=2, gr_factor=(1, 2),
                       bn_factor=(1, 2), block_layers=(2, 1), head_width=8, head_convs=1)
    model = build_msdnet(cfg)
    assert model.config["block_layers"] == (2, 1) and model.num_exits == 2
