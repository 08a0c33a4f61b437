"""The layer-skip benchmark pipeline end to end on a tiny synthetic dataset (the real runs are benchmarks)."""

import json
from types import SimpleNamespace

import pytest
import torch

from dynaneural.bench.rows import SpeedupRow, write_bench_json
from dynaneural.recipes import Recipe, list_recipes, load_recipe
from dynaneural.sample_wise.layer_skip import bench


def _tiny_data():
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 4
        x = torch.randn(n, 3, 8, 8, generator=g) + y.view(n, 1, 1, 1).float()  # learnable: the mean encodes y
        return x, y

    (tx, ty), (vx, vy), (sx, sy) = split(128), split(64), split(64)
    return SimpleNamespace(train_x=tx, train_y=ty, val_x=vx, val_y=vy, test_x=sx, test_y=sy, num_classes=4,
                           classes=("a", "b", "c", "d"))


@pytest.mark.parametrize("method", ["blockdrop", "aig", "skipnet"])
def test_pipeline_writes_speedup_rows_and_plots(method, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_dataset", lambda *a, **k: _tiny_data())
    arch = {"widths": [4, 8, 8], "blocks_per_stage": 2, "in_chans": 3, "input_size": 8, "num_classes": 4}
    recipe = Recipe.from_dict({
        "name": f"tiny_{method}", "model": bench.METHOD_MODELS[method], "dataset": "cifar10", "model_kwargs": arch,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "calibration": {"budgets": [0.8, 0.01]},  # 0.01 is out of reach: skipped with a message, not a crash
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
        "options": {"backbone_dir": str(tmp_path / "cache"), "calibration_iters": 10, "calibration_tol": 0.05,
                    "backbone_train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "device": "cpu"},
                    "policy": {"epochs": 1, "batch_size": 32}, "rl": {"epochs": 1}}})
    lines = []
    res = bench.run_layer_skip_bench(recipe, method=method, out_dir=tmp_path / "out", log=lines.append)
    rows = res["rows"]
    assert len(rows) == 1 and isinstance(rows[0], SpeedupRow)
    d = rows[0].to_dict()
    for key in ("accuracy", "static_accuracy", "mean_flops", "static_flops", "theoretical_speedup",
                "realized_speedup", "realized_over_theoretical", "blocks_executed_fraction", "gate_threshold"):
        assert key in d
    assert d["achieved_budget"] == pytest.approx(d["mean_flops"] / d["static_flops"])
    assert d["theoretical_speedup"] == pytest.approx(d["static_flops"] / d["mean_flops"])
    assert 0 < d["blocks_executed_fraction"] <= 1
    assert (tmp_path / "out" / f"block_usage_{method}_0.8.png").is_file()
    assert any("out of range" in line for line in lines)
    # the backbone is cached and reused by the next run
    assert any("training ResNet" in line for line in lines)
    lines.clear()
    bench.pretrained_backbone({k: v for k, v in arch.items()}, recipe.options["backbone_train"], _tiny_data(),
                              dataset="cifar10", cache_dir=tmp_path / "cache", log=lines.append)
    assert any("loaded" in line for line in lines)
    path = write_bench_json(tmp_path / "rows.json", rows, method=method)
    assert json.loads(path.read_text())["rows"][0]["method"] == method
    # the trained method is cached too: a re-run re-times without training and gets the same decisions
    lines.clear()
    again = bench.run_layer_skip_bench(recipe, method=method, out_dir=tmp_path / "out", log=lines.append)
    assert any("loaded the trained model" in line for line in lines)
    assert again["rows"][0].accuracy == rows[0].accuracy and again["rows"][0].mean_flops == rows[0].mean_flops


def test_static_control_is_the_backbone_trained_on_with_the_method_settings(tmp_path, monkeypatch):
    """options.static_control trains a gate-free copy with recipe.train, reports it per row, and caches it."""
    monkeypatch.setattr(bench, "load_dataset", lambda *a, **k: _tiny_data())
    arch = {"widths": [4, 8, 8], "blocks_per_stage": 2, "in_chans": 3, "input_size": 8, "num_classes": 4}
    recipe = Recipe.from_dict({
        "name": "tiny_aig_control", "model": "aig_resnet", "dataset": "cifar10", "model_kwargs": arch,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "calibration": {"budgets": [0.8]}, "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
        "options": {"backbone_dir": str(tmp_path / "cache"), "calibration_iters": 10, "calibration_tol": 0.05,
                    "static_control": True,
                    "backbone_train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "device": "cpu"}}})
    lines = []
    rows = bench.run_layer_skip_bench(recipe, method="aig", out_dir=tmp_path / "out", log=lines.append)["rows"]
    acc = rows[0].extra["static_control_accuracy"]
    assert 0.0 <= acc <= 1.0 and rows[0].extra["static_control_train_seconds"] > 0
    assert any(line.startswith("static control") for line in lines)
    # the control differs from the pretrained backbone (it was trained further) and is reloaded next time
    backbone, _ = bench.pretrained_backbone(arch, recipe.options["backbone_train"], _tiny_data(), dataset="cifar10",
                                            cache_dir=tmp_path / "cache", log=lambda _: None)
    ctrl_dir = next((tmp_path / "out" / "checkpoints").glob("static-control-*"))
    from safetensors.torch import load_file

    ctrl = load_file(str(ctrl_dir / "model.safetensors"))
    assert any(not torch.equal(ctrl[k], v) for k, v in backbone.state_dict().items() if v.is_floating_point())
    lines.clear()
    again = bench.run_layer_skip_bench(recipe, method="aig", out_dir=tmp_path / "out", log=lines.append)["rows"]
    assert any("static control: loaded" in line for line in lines)
    assert again[0].extra["static_control_accuracy"] == acc


def test_method_and_recipe_must_agree():
    recipe = load_recipe("layer_skip_aig_cifar10")
    with pytest.raises(ValueError, match="not blockdrop_resnet"):
        bench.run_layer_skip_bench(recipe, method="blockdrop", out_dir="/tmp/unused")
    with pytest.raises(ValueError, match="unknown method"):
        bench.run_layer_skip_bench(recipe, method="dropout", out_dir="/tmp/unused")


def test_shipped_layer_skip_recipes_parse_with_quick_variants():
    names = [n for n in list_recipes() if n.startswith("layer_skip_")]
    assert {f"layer_skip_{m}_{d}" for m in ("skipnet", "aig", "blockdrop") for d in ("cifar10", "mnist")} <= set(names)
    for n in names:
        r = load_recipe(n)
        q = r.quick_variant()
        assert r.model == bench.METHOD_MODELS[n.split("_")[2]]
        assert q.data.get("train_limit") and q.calibration.budgets


def test_cli_parser_has_layer_skip():
    from dynaneural.cli.main import build_parser

    args = build_parser().parse_args(["bench", "layer-skip", "--method", "aig", "--quick", "--json", "x.json"])
    assert args.method == "aig" and args.quick and args.dataset is None and args.default_dataset == "cifar10"


def test_from_scratch_trains_the_gated_network_without_the_backbone_weights(tmp_path, monkeypatch):
    """options.from_scratch: the gated ResNet starts from a random init (not the backbone), the backbone stays the
    static reference, the rows say so, and BlockDrop (which needs a pretrained ResNet) refuses it."""
    monkeypatch.setattr(bench, "load_dataset", lambda *a, **k: _tiny_data())
    arch = {"widths": [4, 8, 8], "blocks_per_stage": 2, "in_chans": 3, "input_size": 8, "num_classes": 4}
    train_cfg = {"epochs": 1, "batch_size": 32, "lr": 0.05, "device": "cpu"}
    spec = {"name": "tiny_aig_scratch", "model": "aig_resnet", "dataset": "cifar10", "model_kwargs": arch,
            "train": train_cfg, "calibration": {"budgets": [0.8]},
            "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
            "options": {"backbone_dir": str(tmp_path / "cache"), "calibration_iters": 10, "calibration_tol": 0.05,
                        "from_scratch": True, "backbone_train": dict(train_cfg)}}
    seen = []
    real_train = bench.train

    def spy(model, **kw):
        if isinstance(model, bench.LayerSkipNetwork):  # the method's training: what does it start from?
            seen.append({k: v.clone() for k, v in model.backbone.state_dict().items()})
        return real_train(model, **kw)

    monkeypatch.setattr(bench, "train", spy)
    lines = []
    rows = bench.run_layer_skip_bench(Recipe.from_dict(spec), method="aig", out_dir=tmp_path / "out",
                                      log=lines.append)["rows"]
    assert rows[0].extra["from_scratch"] is True
    backbone, meta = bench.pretrained_backbone(arch, train_cfg, _tiny_data(), dataset="cifar10",
                                               cache_dir=tmp_path / "cache", log=lambda _: None)
    assert rows[0].static_accuracy == meta["test_accuracy"]
    start = seen[0]
    assert any(not torch.equal(start[k], v) for k, v in backbone.state_dict().items() if v.is_floating_point())
    assert not any("warning" in line for line in lines)  # same settings as the backbone: an equal-training reference
    lines.clear()
    other = {**spec, "name": "tiny_aig_scratch_lr", "train": {**train_cfg, "lr": 0.01}}
    bench.run_layer_skip_bench(Recipe.from_dict(other), method="aig", out_dir=tmp_path / "out2", log=lines.append)
    assert any("not equally trained" in line for line in lines)
    with pytest.raises(ValueError, match="pretrained"):
        bench.run_layer_skip_bench(Recipe.from_dict({**spec, "model": "blockdrop_resnet"}), method="blockdrop",
                                   out_dir=tmp_path / "out3")


def test_an_interrupted_method_training_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    """The method's training checkpoints every epoch beside its cache, so a cut run (a session ending) resumes."""
    import dataclasses

    monkeypatch.setattr(bench, "load_dataset", lambda *a, **k: _tiny_data())
    arch = {"widths": [4, 8, 8], "blocks_per_stage": 2, "in_chans": 3, "input_size": 8, "num_classes": 4}
    train_cfg = {"epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu"}
    recipe = Recipe.from_dict({
        "name": "tiny_aig_resume", "model": "aig_resnet", "dataset": "cifar10", "model_kwargs": arch,
        "train": train_cfg, "calibration": {"budgets": [0.8]},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
        "options": {"backbone_dir": str(tmp_path / "cache"), "calibration_iters": 10, "calibration_tol": 0.05,
                    "from_scratch": True, "backbone_train": dict(train_cfg)}})
    real_train = bench.train
    results = []

    def cut_after_one_epoch(model, **kw):
        if not isinstance(model, bench.LayerSkipNetwork):
            return real_train(model, **kw)
        real_train(model, **{**kw, "config": dataclasses.replace(kw["config"], max_steps=4)})  # 128 images / 32
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "train", cut_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        bench.run_layer_skip_bench(recipe, method="aig", out_dir=tmp_path / "out", log=lambda _: None)
    assert list((tmp_path / "out" / "checkpoints").glob("method-aig-*/resume/train/last.safetensors"))

    def record(model, **kw):
        res = real_train(model, **kw)
        if isinstance(model, bench.LayerSkipNetwork):
            results.append(res)
        return res

    monkeypatch.setattr(bench, "train", record)
    rows = bench.run_layer_skip_bench(recipe, method="aig", out_dir=tmp_path / "out", log=lambda _: None)["rows"]
    assert results and results[0].resumed_from is not None and rows
    # the reported training time counts both epochs, the one before the cut included
    assert len(results[0].history) == 2
    assert rows[0].extra["method_train_seconds"]["train"] == pytest.approx(
        sum(e["seconds"] for e in results[0].history))
