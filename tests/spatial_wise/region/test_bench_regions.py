"""The regions benchmark (GFNet, RANet, static RANet family) end to end on tiny synthetic data."""

from dynaneural.cli.bench_regions import run_region_bench
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
    assert {"static_ranet_1", "static_ranet_full", "ranet"} <= methods
    assert all(r.static_flops == res["rows"][0].static_flops and r.realized_speedup > 0 for r in res["rows"])
    static1 = next(r for r in res["rows"] if r.method == "static_ranet_1")
    assert static1.theoretical_speedup > 1 and static1.extra == {"family": "static", "stages": 1}
    tags = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints").iterdir())
    assert tags == ["gfnet", "ranet", "static1"]
    assert all((p / "last.safetensors").is_file() for p in (tmp_path / "checkpoints").iterdir())
    # a second run loads the three trainings instead of training again: same accuracies, checkpoints untouched
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("checkpoints/*/last.safetensors")}
    again = run_region_bench(_recipe(), out_dir=tmp_path, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("checkpoints/*/last.safetensors")} == stamps
    assert [r.accuracy for r in again["rows"] if r.extra.get("family") == "static"] == \
           [r.accuracy for r in res["rows"] if r.extra.get("family") == "static"]
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def test_regions_recipe_trains_gfnet_with_its_own_optimizer():
    recipe = load_recipe("regions_fashion_mnist")
    assert recipe.options["gfnet_train"]["optimizer"] == "adamw"
    assert recipe.train["optimizer"] == "sgd"
