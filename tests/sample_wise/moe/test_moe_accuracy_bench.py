"""The MoE-vs-dense-twin accuracy benchmark end to end on tiny synthetic data (the real run is a benchmark)."""

import pytest
import torch

from dynaneural.cli.bench_moe_accuracy import run_moe_accuracy_bench, training_fit
from dynaneural.recipes import Recipe, load_recipe

_TINY_KWARGS = {"moe_transformer_mnist": {"dim": 16}, "moe_mlp_mnist": {"dim": 16},
                "moe_convnet_mnist": {"widths": [4, 8, 8]}}


@pytest.mark.parametrize("model", sorted(_TINY_KWARGS))
def test_moe_accuracy_bench_trains_both_and_compares_equal_active_flops(tiny_mnist, model):
    tiny_mnist(train=96, val=32, test=48)
    recipe = Recipe.from_dict({
        "name": "tiny_moe_accuracy", "model": model, "dataset": "mnist",
        "model_kwargs": {"num_experts": 4, "top_k": 2, "hidden": 16, "depth": 1, "num_classes": 3,
                         **_TINY_KWARGS[model]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32}})
    lines: list[str] = []
    res = run_moe_accuracy_bench(recipe, log=lines.append)
    (row,) = res["rows"]
    assert res["meta"]["dense_kwargs"]["num_experts"] == 1 and res["meta"]["dense_kwargs"]["hidden"] == 32
    # equal active FLOPs: the MoE pays only its wider router (E instead of 1 logit per token) on top
    assert row.theoretical_speedup == pytest.approx(1.0, rel=0.02) and row.theoretical_speedup < 1.0
    assert row.extra["moe_params"] > row.extra["dense_params"]
    assert row.extra["train_fit_samples"] == 2000 and 0.0 <= row.extra["dense_train_fit_accuracy"] <= 1.0
    assert row.extra["train_fit_cross_entropy"] > 0 and row.extra["dense_train_fit_cross_entropy"] > 0
    assert 0.0 <= row.accuracy <= 1.0 and row.realized_speedup > 0
    assert any(line.startswith("moe:") for line in lines) and any(line.startswith("dense:") for line in lines)


def test_moe_accuracy_bench_with_a_shared_expert_uses_the_same_dense_twin(tiny_mnist):
    """Shared width 8 + top-1 of 4 routed experts of width 8: the dense twin is one SwiGLU of width 16, exactly the
    twin of a top-2 MoE of width 8 (so a cached twin is shared between the two recipes); routing-only options such
    as straight-through weights do not reach the one-expert twin."""
    tiny_mnist(train=96, val=32, test=48)
    kwargs = {"num_experts": 4, "hidden": 8, "depth": 1, "num_classes": 3, "widths": [4, 8, 8]}
    recipe = Recipe.from_dict({
        "name": "tiny_moe_shared", "model": "moe_convnet_mnist", "dataset": "mnist",
        "model_kwargs": {**kwargs, "top_k": 1, "shared_hidden": 8, "straight_through_weights": True},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32}})
    res = run_moe_accuracy_bench(recipe, log=lambda _: None)
    (row,) = res["rows"]
    assert res["meta"]["dense_kwargs"] == {**kwargs, "num_experts": 1, "top_k": 1, "hidden": 16,
                                           "capacity_factor": None}
    assert row.method == "moe_top1_of_4_shared8"
    assert row.theoretical_speedup == pytest.approx(1.0, rel=0.02) and row.theoretical_speedup < 1.0


def test_moe_accuracy_recipe_parses_and_rejects_expert_choice(tiny_mnist):
    assert load_recipe("moe_accuracy_mnist").model_kwargs["top_k"] == 2
    assert load_recipe("moe_accuracy_mnist_mlp").model == "moe_mlp_mnist"
    assert load_recipe("moe_accuracy_cifar10_cnn").model == "moe_convnet_cifar10"
    tiny_mnist(train=96, val=32, test=48)
    recipe = Recipe.from_dict({"name": "x", "model": "moe_transformer_mnist", "dataset": "mnist",
                               "model_kwargs": {"routing": "expert_choice"}})
    with pytest.raises(ValueError, match="top-k routing"):
        run_moe_accuracy_bench(recipe, log=lambda s: None)


def test_moe_accuracy_bench_reuses_its_trainings_and_checks_augment(tiny_mnist, tmp_path):
    tiny_mnist(train=64, val=32, test=32)
    recipe = Recipe.from_dict({
        "name": "tiny_moe_accuracy", "model": "moe_transformer_mnist", "dataset": "mnist",
        "model_kwargs": {"num_experts": 4, "top_k": 2, "dim": 16, "hidden": 16, "depth": 1, "num_classes": 3},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32}, "options": {"augment": "cifar"}})
    first = run_moe_accuracy_bench(recipe, out_dir=tmp_path, log=lambda s: None)
    ckpts = sorted((tmp_path / "checkpoints").rglob("last.safetensors"))
    assert len(ckpts) == 2 and first["meta"]["augment"] == "cifar"
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    again = run_moe_accuracy_bench(recipe, out_dir=tmp_path, log=lambda s: None)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps  # nothing retrained
    assert again["rows"][0].accuracy == first["rows"][0].accuracy
    recipe.options["augment"] = "mixup"
    with pytest.raises(ValueError, match="augment"):
        run_moe_accuracy_bench(recipe, log=lambda s: None)


def test_moe_transformer_cifar10_is_64_patch_tokens():
    from dynaneural.registry import create_model

    model = create_model("moe_transformer_cifar10", dim=16, hidden=16, depth=1, num_experts=4).eval()
    out = model(torch.randn(3, 3, 32, 32), mode="execute")
    assert out.logits.shape == (3, 10) and model.num_tokens == 64


def test_moe_accuracy_cli_over_seeds_writes_one_json_with_a_summary(tiny_mnist, tmp_path):
    import json

    import yaml

    from dynaneural.cli.main import main

    tiny_mnist(train=64, val=32, test=32)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny_moe_accuracy", "model": "moe_mlp_mnist", "dataset": "mnist",
        "model_kwargs": {"num_experts": 4, "top_k": 2, "dim": 16, "hidden": 16, "depth": 1, "num_classes": 3},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu", "seed": 0},
        "bench": {"batch_sizes": [16, 32], "repeats": 1, "timed_samples": 32}}))
    out = tmp_path / "seeds.json"
    common = ["bench", "moe-accuracy", "--recipe", str(recipe), "--no-allocator-tuning", "--no-progress"]
    assert main([*common, "--seeds", "0", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [0, 1] and sorted(doc["per_seed_meta"]) == ["0", "1"]
    assert [r["seed"] for r in doc["rows"]] == [0, 0, 1, 1]  # two timed batch sizes per seed
    (summary,) = doc["summary"].values()
    gains = [r["accuracy_gain_pp"] for r in doc["rows"] if r["batch_size"] == 16]
    assert summary["gain_pp"] == pytest.approx(gains) and summary["seeds"] == [0, 1]
    assert summary["gain_pp_mean"] == pytest.approx(sum(gains) / 2)
    assert {"gain_pp_sem", "gain_t_test_p", "gain_sign_test_p", "gain_seeds_ahead"} <= set(summary)
    with pytest.raises(SystemExit, match="not both"):
        main([*common, "--seed", "1", "--seeds", "0"])


def test_moe_accuracy_bench_upcycles_the_dense_twin(tiny_mnist, tmp_path):
    tiny_mnist(train=96, val=32, test=48)
    recipe = Recipe.from_dict({
        "name": "tiny_moe_upcycle", "model": "moe_convnet_mnist", "dataset": "mnist",
        "model_kwargs": {"num_experts": 4, "top_k": 2, "hidden": 8, "depth": 1, "num_classes": 3,
                         "widths": [4, 8, 8]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu"},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
        "options": {"upcycle": {"num_experts": 4, "top_k": 1, "epochs": 1, "lr": 0.005}}})
    res = run_moe_accuracy_bench(recipe, out_dir=tmp_path, log=lambda s: None)
    moe_row, up_row = res["rows"]
    assert moe_row.method == "moe_top2_of_4" and up_row.method == "upcycled_top1_of_4"
    # top-1 of copies of the dense layer: the continued dense model's active FLOPs plus the 4-way router
    assert up_row.theoretical_speedup == pytest.approx(1.0, rel=0.02)
    assert up_row.extra["reference"] == "dense twin continued" and up_row.extra["moe_params"] > up_row.extra["dense_params"]
    assert res["meta"]["upcycle"]["continued_training"]["lr"] == 0.005
    assert len(sorted((tmp_path / "checkpoints").rglob("last.safetensors"))) == 4  # dense, moe, continued, upcycled
    recipe.options["upcycle"] = {"epochs": 1, "momentum": 0.5}
    with pytest.raises(ValueError, match="unknown keys"):
        run_moe_accuracy_bench(recipe, out_dir=tmp_path, log=lambda s: None)


def test_training_fit_is_cross_entropy_and_accuracy_in_execute_mode():
    from types import SimpleNamespace

    class Fixed(torch.nn.Module):
        """Logits log(p) with p = 0.5 on class 0 and the rest spread: CE = log 2 for class-0 targets."""

        def forward(self, x, *, mode):
            assert mode == "execute" and not torch.is_grad_enabled()
            p = torch.full((x.shape[0], 3), 0.25)
            p[:, 0] = 0.5
            return SimpleNamespace(logits=p.log())

    model = Fixed().train()
    x, y = torch.zeros(5, 1), torch.tensor([0, 0, 1, 2, 0])
    fit = training_fit(model, x, y, batch_size=2)
    expected_ce = (3 * torch.tensor(2.0).log() + 2 * torch.tensor(4.0).log()) / 5
    assert fit["cross_entropy"] == pytest.approx(float(expected_ce)) and fit["accuracy"] == pytest.approx(0.6)
    assert model.training  # restored
