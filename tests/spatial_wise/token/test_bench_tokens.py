"""The token benchmark end to end on tiny synthetic data: every method, and checkpoints reused on a re-run."""


from dynaneural.cli.bench_tokens import run_token_bench
from dynaneural.recipes import Recipe


def _recipe():
    return Recipe.from_dict({
        "name": "tiny_tokens", "model": "dynamicvit_mnist", "dataset": "mnist",
        "model_kwargs": {"dim": 16, "depth": 6, "heads": 2, "mlp_ratio": 2.0, "num_classes": 3},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.001, "optimizer": "adamw", "device": "cpu"},
        "bench": {"batch_sizes": [16], "repeats": 1, "timed_samples": 32},
        "options": {"keep_tokens": 0.8, "finetune_epochs": 1, "calibration_samples": 32,
                    "dynamicvit_kwargs": {"prune_before": [1, 3], "keep_ratio": 0.66},
                    "avit_kwargs": {"gate_center": 0.0}}})


def test_token_bench_runs_every_method_and_reuses_its_checkpoints(tiny_mnist, tmp_path):
    tiny_mnist(train=64, val=32, test=32)
    first = run_token_bench(_recipe(), out_dir=tmp_path, log=lambda s: None)
    assert [r.method for r in first["rows"]] == ["dynamicvit", "avit", "tome"]
    for r in first["rows"]:
        assert r.mean_flops < r.static_flops and 0 <= r.accuracy <= 1 and r.realized_speedup > 0
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["avit", "backbone", "dynamicvit", "static"]  # tome is not trained
    # A second run with the same settings trains nothing: same weights, same accuracies.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*.safetensors")}
    again = run_token_bench(_recipe(), out_dir=tmp_path, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r.accuracy for r in again["rows"]] == [r.accuracy for r in first["rows"]]
    assert again["meta"]["static_accuracy"] == first["meta"]["static_accuracy"]
