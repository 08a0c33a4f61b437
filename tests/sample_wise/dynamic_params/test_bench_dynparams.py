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
    assert made[0] == ("condconv_mnist", {"seed": 0, "num_experts": 2})  # the recipe's kwargs reach the factory
    meta = first["meta"]
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
