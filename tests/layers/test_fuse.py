import pytest
import torch

import dynaneural as dn
from dynaneural.layers import PooledLinearHead, fold_batch_norms
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork

MULTI_EXIT = [n for n in dn.list_models("test_*") if isinstance(dn.create_model(n), MultiExitNetwork)]


@pytest.mark.parametrize("name", MULTI_EXIT)
def test_folded_model_matches_and_has_no_batch_norm(name):
    model = dn.create_model(name).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *model.input_shape), mode="train")  # non-trivial running statistics
    model.eval()
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(8, *model.input_shape)
    with torch.inference_mode():
        torch.testing.assert_close(folded.to_static()(x), model.to_static()(x), rtol=1e-4, atol=1e-5)
    assert folded.cost_profile().static_total < model.cost_profile().static_total  # batch norm no longer charged


def test_pooled_head_fast_path_equals_adaptive_pooling():
    head = PooledLinearHead(8, 5, pool=2)
    x = torch.randn(3, 8, 14, 14)
    ref = head.fc(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))
    torch.testing.assert_close(head(x), ref, rtol=1e-5, atol=1e-6)
    x7 = torch.randn(3, 8, 7, 7)  # non-divisible: falls back to the adaptive kernel
    torch.testing.assert_close(head(x7), head.fc(torch.nn.functional.adaptive_avg_pool2d(x7, 2).flatten(1)))


@pytest.mark.parametrize("shape,out", [((3, 5, 14, 14), 2), ((3, 5, 7, 7), 2), ((2, 4, 8, 6), (4, 3)),
                                       ((2, 4, 7, 7), 1), ((1, 3, 9, 9), 3), ((2, 3, 7, 7), (1, 7))])
def test_fast_adaptive_pool_matches_the_generic_kernel(shape, out):
    from dynaneural.layers.blocks import FastAdaptiveAvgPool2d

    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(FastAdaptiveAvgPool2d(out)(x), torch.nn.functional.adaptive_avg_pool2d(x, out))
