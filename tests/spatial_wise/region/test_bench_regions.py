"""The regions benchmark (GFNet, RANet, static RANet family) end to end on tiny synthetic data."""

import pytest

from dynaneural.bench.rows import SpeedupRow
from dynaneural.cli.bench_regions import region_dominance, run_region_bench
from dynaneural.recipes import Recipe, load_recipe


def _recipe() -> Recipe:
    return Recipe.from_dict({
        "name": "tiny_regions", "model": "ranet_mnist", "dataset": "mnist", "model_kwargs": {"num_classes": 3},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "device": "cpu", "seed": 0},
        "calibration": {"budgets": [0.5]},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
        "options": {"static_stages": [1], "gfnet_kwargs": {"num_classes": 3},
                    "gfnet_train": {"optimizer": "adamw", "lr": 0.003, "momentum": 0.0, "nesterov": False}}})


def test_region_bench_rows_and_checkpoints_are_reused(tiny_mnist, tmp_path):
    tiny_mnist(train=64, val=48, test=32)
    lines: list[str] = []
    res = run_region_bench(_recipe(), out_dir=tmp_path, log=lines.append)
    methods = {r.method for r in res["rows"]}
    assert {"static_ranet_1", "static_ranet_full", "ranet", "static_glance"} <= methods
    assert all(r.static_flops == res["rows"][0].static_flops and r.realized_speedup > 0 for r in res["rows"])
    static1 = next(r for r in res["rows"] if r.method == "static_ranet_1")
    assert static1.theoretical_speedup > 1 and static1.extra == {"family": "static", "stages": 1}
    dom = res["meta"]["dominance"]["ranet@16"]
    assert [p["budget"] for p in dom["points"]] == [0.5] and isinstance(dom["dominates"], bool)
    tags = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints").iterdir())
    assert tags == ["gfnet", "glance", "ranet", "static1"]
    assert all((p / "last.safetensors").is_file() for p in (tmp_path / "checkpoints").iterdir())
    # a second run loads the four trainings instead of training again: same accuracies, checkpoints untouched
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("checkpoints/*/last.safetensors")}
    again = run_region_bench(_recipe(), out_dir=tmp_path, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("checkpoints/*/last.safetensors")} == stamps
    assert [r.accuracy for r in again["rows"] if r.extra.get("family") == "static"] == \
           [r.accuracy for r in res["rows"] if r.extra.get("family") == "static"]
    assert len(list((tmp_path / "checkpoints").iterdir())) == 4


def test_regions_recipe_trains_gfnet_with_its_own_optimizer():
    recipe = load_recipe("regions_fashion_mnist")
    assert recipe.options["gfnet_train"]["optimizer"] == "adamw"
    assert recipe.train["optimizer"] == "sgd"


def _row(method: str, family: str, accuracy: float, speedup: float, budget: float = 1.0) -> SpeedupRow:
    return SpeedupRow(method=method, batch_size=64, accuracy=accuracy, mean_flops=1.0, static_flops=1.0,
                      theoretical_speedup=speedup, realized_speedup=speedup, realized_over_theoretical=1.0,
                      static_ms_per_sample=1.0, dynamic_ms_per_sample=1.0 / speedup, timed_samples=64, budget=budget,
                      extra={"family": family})


def test_region_dominance_interpolates_the_static_family_at_equal_measured_time():
    rows = [_row("static_a", "static", 0.80, 10.0), _row("static_b", "static", 0.90, 2.0),
            _row("static_full", "static", 0.88, 1.0),
            _row("gfnet", "dynamic", 0.86, 4.0, 0.5),   # t = 0.25, between a (0.1) and b (0.5): static 0.8375
            _row("ranet", "dynamic", 0.85, 1.25, 0.7)]  # t = 0.8, between b (0.5) and full (1.0): static 0.888
    dom = region_dominance(rows)
    assert dom.keys() == {"gfnet@64", "ranet@64"}
    assert dom["gfnet@64"]["dominates"] and not dom["ranet@64"]["dominates"]
    assert dom["gfnet@64"]["points"][0]["margin_pp"] == pytest.approx(2.25)
    assert dom["ranet@64"]["points"][0]["margin_pp"] == pytest.approx(-3.8)
