"""The command line, end to end on the embedded digits (quick variants; no allocator re-exec inside pytest)."""

import json
from pathlib import Path

import pytest
import torch

from dynaneural.cli.main import main
from dynaneural.recipes import Recipe, list_recipes, load_recipe


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_parses(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert isinstance(recipe.quick_variant(), Recipe)


def test_recipe_typos_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: exit_convnet_digits\ndataset: digits\ntrain: {epoch: 3}\n")
    with pytest.raises(ValueError, match="epoch"):
        load_recipe(bad)
    bad.write_text("name: x\nmodel: exit_convnet_digitz\ndataset: digits\n")
    with pytest.raises(ValueError, match="did you mean"):
        load_recipe(bad)
    bad.write_text("name: x\nmodel: exit_convnet_digits\ndataset: digits\ncalibration: {unit: joules}\n")
    with pytest.raises(ValueError, match="unit"):
        load_recipe(bad)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--no-progress", "--no-allocator-tuning", "--out", str(out)]) == 0
    return out


def test_demo_writes_metrics_and_plots(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    rows = metrics["rows"]
    assert {r["batch_size"] for r in rows} == {1, 64}
    for r in rows:
        for key in ("budget", "batch_size", "accuracy", "mean_flops", "theoretical_speedup", "realized_speedup"):
            assert key in r
        assert 0 < r["mean_flops"] <= metrics["full_depth_flops"]
        assert abs(r["theoretical_speedup"] - metrics["full_depth_flops"] / r["mean_flops"]) < 1e-9
        # the same budget held online on the test stream, recorded beside the fixed-threshold figure
        assert 0 <= r["controlled_accuracy"] <= 1
        assert r["controlled_budget_error"] == pytest.approx(r["controlled_achieved_budget"] / r["budget"] - 1)
    for png in ("accuracy_vs_compute.png", "exit_histogram.png"):
        assert (demo_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_and_eval_from_checkpoint(demo_run, capsys):
    ckpt = demo_run / "model.safetensors"
    out = demo_run / "calibrated.safetensors"
    assert main(["calibrate", "--checkpoint", str(ckpt), "--dataset", "digits", "--budget", "0.5",
                 "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["achieved"] == pytest.approx(0.5, rel=0.03)
    assert main(["eval", "--checkpoint", str(out), "--dataset", "digits", "--split", "val"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["mode"] == "execute" and 0 < ev["accuracy"] <= 1
    assert ev["theoretical_speedup"] == pytest.approx(2.0, rel=0.05)


def test_bad_inputs_give_one_line_errors(demo_run, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((demo_run / "model.safetensors").read_bytes()[:500])
    assert main(["eval", "--checkpoint", str(corrupt), "--dataset", "digits"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(demo_run / "model.safetensors"), "--dataset", "digits",
                 "--budget", "7", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_models_lists_registry(capsys):
    assert main(["models", "test_*"]) == 0
    assert "test_exit_convnet" in capsys.readouterr().out.split()


@pytest.mark.parametrize("kind,model_name", [("kept-tokens", "test_dynamicvit"), ("regions", "test_gfnet"),
                                             ("pixel-mask", "test_dynconv")])
def test_visualize_kinds_render_pngs(kind, model_name, tmp_path):
    import dynaneural as dn
    from dynaneural.cli.cmd_visualize import available_kinds
    from dynaneural.contract import example_input

    kinds = available_kinds()
    assert {"kept-tokens", "regions", "pixel-mask"} <= kinds.keys()
    model = dn.create_model(model_name).eval()
    paths = kinds[kind](model, example_input(model, 4, generator=torch.Generator().manual_seed(0)), tmp_path)
    assert paths and all(p.suffix == ".png" and p.stat().st_size > 0 for p in map(Path, paths))


@pytest.mark.parametrize("bench", ["moe-accuracy", "width", "dynparams", "tokens", "regions", "layer-skip",
                                   "early-exit"])
def test_bench_dataset_defaults_to_the_recipes(bench):
    from dynaneural.cli.main import build_parser, resolve_recipe

    parser = build_parser()
    args = parser.parse_args(["bench", bench, *(["--method", "aig"] if bench == "layer-skip" else [])])
    assert args.dataset is None and args.default_dataset
    recipe = resolve_recipe(args, prefix="moe_accuracy") if bench == "moe-accuracy" else None
    if recipe is not None:  # no --recipe: <prefix>_<default dataset>
        assert recipe.name == "moe_accuracy_mnist" and args.dataset == "mnist"


def test_recipe_gives_the_dataset_and_a_contradicting_dataset_is_an_error():
    from dynaneural.cli.main import build_parser, resolve_recipe

    parser = build_parser()
    args = parser.parse_args(["bench", "moe-accuracy", "--recipe", "moe_accuracy_cifar10_cnn"])
    assert resolve_recipe(args, prefix="moe_accuracy").dataset == "cifar10" and args.dataset == "cifar10"
    args = parser.parse_args(["bench", "moe-accuracy", "--recipe", "moe_accuracy_cifar10_cnn", "--dataset", "cifar10"])
    assert resolve_recipe(args, prefix="moe_accuracy").name == "moe_accuracy_cifar10_cnn"
    args = parser.parse_args(["bench", "moe-accuracy", "--recipe", "moe_accuracy_cifar10_cnn", "--dataset", "mnist"])
    with pytest.raises(SystemExit, match="is for dataset cifar10, not mnist"):
        resolve_recipe(args, prefix="moe_accuracy")
