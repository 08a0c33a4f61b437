"""The dynamic-parameter benchmark end to end on tiny synthetic data: rows, the equal-FLOPs static reference,
per-method kwargs, augmentation switch, and trainings reused on a re-run."""

import pytest

from dynaneural.cli.bench_dynparams import run_dynparams_bench
from dynaneural.recipes import Recipe


def _recipe(**options):
    return Recipe.from_dict({
        "name": "tiny_dynparams", "model": "condconv_mnist", "dataset": "mnist",
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "optimizer": "adamw", "device": "cpu"},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32, "timed_samples_batch1": 4},
        "options": {"methods": ["condconv", "dynamic_conv"], "gated_dense": False,
                    "backbone": {"in_chans": 1, "input_size": 28, "num_classes": 3, "widths": [8, 16, 16]},
                    "model_kwargs": {"condconv": {"num_experts": 2}},
                    "equal_flops_widths": [8, 18, 18], **options}})


def test_dynparams_bench_rows_equal_flops_reference_and_reuse(tiny_mnist, tmp_path, monkeypatch):
    import dynaneural.registry as registry

    tiny_mnist(train=64, val=32, test=32)
    made = []
    create = registry.create_model
    monkeypatch.setattr(registry, "create_model", lambda name, **kw: made.append((name, kw)) or create(name, **kw))
    first = run_dynparams_bench(_recipe(), out_dir=tmp_path, log=lambda s: None)
    assert [(r.method, r.batch_size) for r in first["rows"]] == [("condconv", 16), ("dynamic_conv", 16)]
    # The recipe's kwargs reach the factory, and the dynamic models get the static backbone's widths and classes.
    assert made[0] == ("condconv_mnist", {"seed": 0, "widths": (8, 16, 16), "num_classes": 3, "num_experts": 2})
    assert made[1][1]["widths"] == (8, 16, 16)
    meta = first["meta"]
    assert meta["seed"] == 0
    assert meta["equal_flops_static_flops"] > meta["static_flops"]
    for r in first["rows"]:
        assert r.mean_flops > r.static_flops  # routing and kernel mixing cost a little more than the static conv
        gain = (r.accuracy - meta["equal_flops_static_accuracy"]) * 100
        assert r.extra["accuracy_gain_vs_equal_flops_pp"] == pytest.approx(gain)
        assert r.extra["simulate_execute_max_abs_diff"] < 1e-4
    ckpts = sorted((tmp_path / "checkpoints").rglob("last.safetensors"))
    assert len(ckpts) == 4  # two static CNNs, two dynamic models
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    again = run_dynparams_bench(_recipe(), out_dir=tmp_path, log=lambda s: None)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps  # nothing retrained
    assert [r.accuracy for r in again["rows"]] == [r.accuracy for r in first["rows"]]
    run_dynparams_bench(_recipe(augment="cifar"), out_dir=tmp_path, log=lambda s: None)
    assert len(sorted((tmp_path / "checkpoints").rglob("last.safetensors"))) == 8  # augmentation: new trainings


def test_dynparams_bench_rejects_an_unknown_augmentation(tiny_mnist):
    tiny_mnist(train=32, val=32, test=16)
    with pytest.raises(ValueError, match="augment"):
        run_dynparams_bench(_recipe(augment="mixup"), log=lambda s: None)


def test_dynparams_bench_rejects_an_unknown_method(tiny_mnist):
    tiny_mnist(train=32, val=32, test=16)
    with pytest.raises(ValueError, match="unknown methods"):
        run_dynparams_bench(_recipe(methods=["condconv", "lora"]), log=lambda s: None)


def test_bench_seed_and_methods_flags_override_the_recipe():
    """``--seed`` changes only the training seed (the split seed stays); ``--methods`` narrows the method list."""
    import argparse

    from dynaneural.cli.main import _recipe as load

    args = argparse.Namespace(recipe="dynparams_mnist", epochs=None, quick=False, seed=3,
                              methods="condconv, dynamic_conv")
    recipe = load(args)
    assert recipe.train["seed"] == 3 and recipe.data["seed"] == 0
    assert recipe.options["methods"] == ["condconv", "dynamic_conv"]
    default = load(argparse.Namespace(recipe="dynparams_mnist", epochs=None, quick=False, seed=None, methods=None))
    assert default.train["seed"] == 0 and default.options["methods"] == ["condconv", "dynamic_conv", "squeeze_excite"]


def test_dataset_config_widths_and_refusals():
    from dynaneural.registry import create_model
    from dynaneural.sample_wise.dynamic_params.backbone import dataset_config

    assert dataset_config("mnist").widths == (32, 64, 128)
    assert dataset_config("cifar10", widths=[8, 16, 32, 32]).strides == (1, 2, 2, 1)
    for name in ("condconv_mnist", "dynamic_conv_mnist", "se_convnet_mnist", "hypernetwork_mnist"):
        assert create_model(name, widths=(8, 16, 32)).config["widths"] == (8, 16, 32)
    with pytest.raises(ValueError, match="widths"):
        dataset_config("mnist", widths=(8, 16))
    with pytest.raises(ValueError, match="widths"):
        dataset_config("cifar10", widths=(8, 0, 16, 16))
    with pytest.raises(ValueError, match="layout"):
        dataset_config("imagenet")


def test_seed_summary_gains_across_seeds():
    from dynaneural.bench.rows import SpeedupRow
    from dynaneural.cli.bench_dynparams import seed_summary

    def run(acc, static, equal):
        rows = [SpeedupRow(method="condconv", batch_size=b, accuracy=acc, mean_flops=2.0, static_flops=1.9,
                           theoretical_speedup=0.95, realized_speedup=0.5, realized_over_theoretical=0.5,
                           static_ms_per_sample=1.0, dynamic_ms_per_sample=2.0, timed_samples=64,
                           extra={"accuracy_gain_pp": (acc - static) * 100,
                                  "accuracy_gain_vs_equal_flops_pp": (acc - equal) * 100}) for b in (64, 1)]
        return {"rows": rows, "meta": {"static_accuracy": static, "equal_flops_static_accuracy": equal}}

    s = seed_summary({0: run(0.90, 0.88, 0.89), 1: run(0.91, 0.90, 0.92), 2: run(0.93, 0.90, 0.90)})["condconv"]
    assert s["seeds"] == [0, 1, 2]  # one entry per seed, although each seed has two batch-size rows
    assert s["gain_vs_equal_flops_pp"] == pytest.approx([1.0, -1.0, 3.0])
    assert s["gain_vs_equal_flops_pp_mean"] == pytest.approx(1.0)
    assert s["gain_vs_equal_flops_pp_std"] == pytest.approx(2.0)
    assert s["seeds_ahead_of_equal_flops"] == 2
    assert s["gain_pp_mean"] == pytest.approx((2.0 + 1.0 + 3.0) / 3)
    # One-sided tests of a positive gain: sem = sd / sqrt(n); t = 0.866 on 2 degrees of freedom; sign test
    # P(X >= 2 | n = 3, 1/2) = 1/2.
    assert s["gain_vs_equal_flops_pp_sem"] == pytest.approx(2.0 / 3 ** 0.5)
    assert s["gain_vs_equal_flops_t_test_p"] == pytest.approx(0.2391, abs=1e-3)
    assert s["gain_vs_equal_flops_sign_test_p"] == pytest.approx(0.5)
    # A seed whose gain is exactly zero does not count in the sign test; all ahead on 4 seeds: p = 1/16.
    s4 = seed_summary({i: run(0.90 + d, 0.88, 0.90) for i, d in enumerate((0.0, 0.01, 0.02, 0.01, 0.03))})["condconv"]
    assert s4["seeds_ahead_of_equal_flops"] == 4
    assert s4["gain_vs_equal_flops_sign_test_p"] == pytest.approx(1 / 16)
    assert 0 < s4["gain_vs_equal_flops_t_test_p"] < 0.05
    s1 = seed_summary({0: run(0.90, 0.88, 0.89)})["condconv"]
    assert s1["gain_vs_equal_flops_t_test_p"] is None and s1["gain_vs_equal_flops_sign_test_p"] is None
