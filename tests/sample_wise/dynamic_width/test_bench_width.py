"""The width benchmark end to end on tiny synthetic data, and its trainings reused on a re-run."""


import pytest
import torch

from dynaneural.bench.cache import run_digest, training_dir
from dynaneural.cli.bench_width import run_width_bench
from dynaneural.recipes import Recipe


def _recipe():
    return Recipe.from_dict({
        "name": "tiny_width", "model": "slimmable_mnist", "dataset": "mnist",
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "optimizer": "adamw", "device": "cpu"},
        "calibration": {"budgets": [0.6]},
        "bench": {"batch_sizes": [1, 16], "repeats": 1, "timed_samples": 32, "timed_samples_batch1": 4},
        "options": {"gating_keep": [0.5]}})


def test_width_bench_rows_and_reused_trainings(tiny_mnist, tmp_path, monkeypatch):
    tiny_mnist(train=64, val=64, test=32)
    first = run_width_bench(_recipe(), out_dir=tmp_path, log=lambda s: None)
    assert [(r.method, r.batch_size) for r in first["rows"]] == [
        ("slimmable", 1), ("slimmable", 16), ("channel_gating", 1), ("channel_gating", 16)]
    for r in first["rows"]:
        assert 0 < r.mean_flops <= r.static_flops and r.realized_speedup > 0
    ckpts = sorted((tmp_path / "checkpoints").rglob("last.safetensors"))
    assert len(ckpts) == 2
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    again = run_width_bench(_recipe(), out_dir=tmp_path, log=lambda s: None)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps  # nothing retrained
    # a reused training still reports its own training time, not the seconds it took to load it
    assert again["meta"]["slimmable_train_seconds"] == first["meta"]["slimmable_train_seconds"] > 0
    assert [r.accuracy for r in again["rows"]] == [r.accuracy for r in first["rows"]]
    # adding a chooser only changes the evaluation: same checkpoints, one more method
    recipe = _recipe()
    recipe.options["choosers"] = [{"chooser": "policy"}, {"chooser": "cascade", "cascade_levels": [1, 3]}]
    import dynaneural.bench.timing as timing
    grad_modes, real_compare = [], timing.compare

    def spy_compare(*args, **kwargs):  # only the streamed timing calls it by this name
        grad_modes.append(torch.is_grad_enabled())
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(timing, "compare", spy_compare)
    third = run_width_bench(recipe, out_dir=tmp_path, log=lambda s: None)
    assert grad_modes == [False]  # timed without autograd, as the per-batch rows (time_against_static)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert [(r.method, r.batch_size) for r in third["rows"]] == [
        ("slimmable", 1), ("slimmable", 16), ("slimmable_cascade_50_100", 1), ("slimmable_cascade_50_100", 16),
        ("channel_gating", 1), ("channel_gating", 16)]
    cascade = [r for r in third["rows"] if r.method.startswith("slimmable_cascade")]
    assert all(r.extra["cascade_levels"] == [1, 3] and set(r.extra["width_fraction"][i] for i in (0, 2)) == {0.0}
               for r in cascade)
    # the cascade is also timed as a stream in slots of the batch size (batch > 1 only); the policy is not
    streamed = {(r.method, r.batch_size) for r in third["rows"] if "realized_speedup_stream" in r.extra}
    assert streamed == {("slimmable_cascade_50_100", 16)}
    row = next(r for r in cascade if r.batch_size == 16)
    assert row.extra["realized_speedup_stream"] > 0
    assert row.extra["realized_over_theoretical_stream"] == pytest.approx(
        row.extra["realized_speedup_stream"] / row.theoretical_speedup)
    assert [r.accuracy for r in third["rows"][:2]] == [r.accuracy for r in first["rows"][:2]]


def test_training_dir_digest_follows_the_settings(tmp_path):
    assert training_dir(None, "x", 1) is None
    a = training_dir(tmp_path, "x", {"lr": 0.1, "epochs": 2})
    assert a == training_dir(tmp_path, "x", {"epochs": 2, "lr": 0.1})  # key order does not matter
    assert a != training_dir(tmp_path, "x", {"lr": 0.2, "epochs": 2})
    assert a.name == "x-" + run_digest({"lr": 0.1, "epochs": 2}) and a.parent.name == "checkpoints"


def test_width_bench_builds_the_recipe_width_and_can_skip_gating(tiny_mnist):
    tiny_mnist(train=32, val=32, test=16)
    recipe = _recipe()
    recipe.options.update({"gating_keep": [], "slimmable_kwargs": {"widths": [8, 16, 24]}})
    out = run_width_bench(recipe, log=lambda s: None)
    assert [(r.method, r.batch_size) for r in out["rows"]] == [("slimmable", 1), ("slimmable", 16)]
    assert out["rows"][0].static_flops < 7.5e6 / 4  # the narrow network, not the default 32-64-128 one


def test_width_bench_refuses_a_misspelt_chooser_option(tiny_mnist):
    tiny_mnist(train=32, val=32, test=16)
    recipe = _recipe()
    recipe.options.update({"gating_keep": [], "choosers": [{"chooser": "cascade", "ladder": [1, 3]}]})
    with pytest.raises(ValueError, match="cascade_levels"):
        run_width_bench(recipe, log=lambda s: None)
