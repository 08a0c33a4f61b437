"""The spatially gated ResNet bench on a tiny synthetic dataset: started from the layer-skip backbone, cached."""

import dataclasses
from types import SimpleNamespace

import torch

import dynaneural.data
import dynaneural.registry
from dynaneural.cli import bench_spatial
from dynaneural.layers.resnet import CifarResNet, CifarResNetConfig
from dynaneural.recipes import Recipe
from dynaneural.spatial_wise.pixel.dynconv import DynConvConfig, DynConvResNet

ARCH = {"widths": [4, 8, 8], "blocks_per_stage": 2, "in_chans": 3, "input_size": 8}


def _pixel_resnet(num_classes: int = 4) -> DynConvResNet:
    return DynConvResNet(DynConvConfig(input_size=8, num_classes=num_classes, widths=(4, 8, 8), depths=(2, 2, 2),
                                       gate_bias=2.0))


def test_layer_skip_backbone_state_gives_the_same_network_in_the_pixel_resnet():
    torch.manual_seed(0)
    src = CifarResNet(CifarResNetConfig(widths=(4, 8, 8), blocks_per_stage=2, input_size=8, num_classes=4))
    with torch.no_grad():  # non-trivial batch-norm statistics, so a BN mapped to the wrong conv would show
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    static = _pixel_resnet().to_static()
    static.load_state_dict(bench_spatial.layer_skip_state_to_pixel_resnet(src.state_dict()))  # strict: every key
    x = torch.randn(5, 3, 8, 8)
    src.eval()
    static.eval()
    torch.testing.assert_close(static(x), src(x))


def _tiny_data():
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 4
        return torch.randn(n, 3, 8, 8, generator=g) + y.view(n, 1, 1, 1).float(), y

    (tx, ty), (vx, vy), (sx, sy) = split(96), split(48), split(48)
    return SimpleNamespace(train_x=tx, train_y=ty, val_x=vx, val_y=vy, test_x=sx, test_y=sy, num_classes=4)


def test_resnet_bench_starts_from_the_cached_backbone_and_reuses_its_fine_tuning(tmp_path, monkeypatch):
    monkeypatch.setattr(dynaneural.data, "load_dataset", lambda *a, **k: _tiny_data())
    monkeypatch.setattr(dynaneural.registry, "create_model", lambda *a, **k: _pixel_resnet())
    recipe = Recipe.from_dict({
        "name": "tiny_dynconv", "model": "test_dynconv", "dataset": "cifar10",
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "calibration": {"budgets": [0.8]},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32, "timed_samples_batch1": 4},
        "options": {"finetune_epochs": 1, "calibration_samples": 48, "backbone_dir": str(tmp_path / "cache"),
                    "backbone_arch": {**ARCH, "num_classes": 4},
                    "backbone_train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "device": "cpu"}}})
    lines: list[str] = []
    res = bench_spatial.run_resnet_bench(recipe, out_dir=tmp_path / "out", log=lines.append)
    assert any("training ResNet" in line for line in lines)  # the layer-skip backbone, trained once and cached
    backbone = res["meta"]["backbone"]
    assert 0.0 <= backbone["test_accuracy"] <= 1.0 and "layer-skip-backbone-cifar10" in backbone["checkpoint"]
    assert len(res["rows"]) == 1
    row = res["rows"][0]
    assert row.mean_flops < row.static_flops and row.theoretical_speedup > 1
    lines.clear()
    again = bench_spatial.run_resnet_bench(recipe, out_dir=tmp_path / "out", log=lines.append)
    assert any("loaded the fine-tuned model" in line for line in lines)
    assert not any("training ResNet" in line for line in lines)
    assert again["rows"][0].accuracy == row.accuracy and again["rows"][0].mean_flops == row.mean_flops
    assert again["meta"]["static_accuracy"] == res["meta"]["static_accuracy"]
    # a changed recipe does not reuse the old fine-tuning
    changed = dataclasses.replace(recipe, options={**recipe.options, "finetune_lr": 0.001})
    lines.clear()
    bench_spatial.run_resnet_bench(changed, out_dir=tmp_path / "out", log=lines.append)
    assert not any("loaded the fine-tuned model" in line for line in lines)
    assert any("fine-tuning done" in line for line in lines)
    # batch-norm recalibration acts after training: the cached fine-tuning is reused, the budget still fitted
    recal = dataclasses.replace(recipe, options={**recipe.options, "recalibrate_bn_samples": 64})
    lines.clear()
    out = bench_spatial.run_resnet_bench(recal, out_dir=tmp_path / "out", log=lines.append)
    assert any("loaded the fine-tuned model" in line for line in lines)
    r = out["rows"][0]
    assert r.extra["bn_recalibration_samples"] == 64
    assert 0.0 <= r.extra["accuracy_before_bn_recalibration"] <= 1.0
    assert r.mean_flops < r.static_flops
