"""The sequence bench: CLI parsing, timing rows on a tiny size, the SST-2 training/eval helpers on toy data."""

import math
from types import SimpleNamespace

import torch

import dynaneural as dn
from dynaneural.cli.bench_temporal import METHODS, evaluate_text_model, timing_rows, train_text_model
from dynaneural.cli.main import build_parser


def test_cli_parses_every_method():
    for method in METHODS:
        args = build_parser().parse_args(["bench", "temporal", "--method", method, "--no-timing",
                                          "--sizes", "8x16x4x10"])
        assert args.method == method and args.sizes == [(8, 16, 4, 10)]


def test_timing_row_meets_the_work_target_and_has_shared_keys():
    rows = timing_rows("skip-lstm", sizes=[(16, 16, 4, 12)], target=0.5, repeats=1, log=lambda s: None)
    d = rows[0].to_dict()
    assert abs(d["achieved_budget"] - 0.5) < 0.1
    assert math.isclose(d["skipped_fraction"], 1 - d["achieved_budget"])
    for key in ("theoretical_speedup", "realized_speedup", "realized_over_theoretical", "static_flops"):
        assert d[key] > 0


def _toy(n=96, steps=10, vocab=30):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, vocab, (n, steps), generator=g)
    y = (x[:, -1] > vocab // 2).long()  # the label is in the last token
    lengths = torch.full((n,), steps)
    return SimpleNamespace(train_x=x, train_y=y, train_len=lengths, val_x=x[:32], val_y=y[:32], val_len=lengths[:32],
                           padding="left")


def test_train_and_evaluate_helpers_run_every_model_kind():
    data = _toy()
    for name in ("test_skip_lstm", "test_lstm_jump", "test_early_stop_lstm"):
        model = dn.create_model(name)
        model.backbone.head = torch.nn.Linear(model.backbone.hidden_size, 2)
        model.num_classes = 2
        hist = train_text_model(model, data, epochs=1, batch_size=32, log=lambda s: None)
        assert len(hist) == 1 and math.isfinite(hist[0]["loss"])
        ev = evaluate_text_model(model, data.val_x, data.val_y, data.val_len, padding="left")
        assert 0 <= ev["accuracy"] <= 1 and 0 < ev["work_fraction"] <= 1 and ev["mean_flops"] > 0


def test_task_rows_adding_trains_both_models_and_calibrates():
    from dynaneural.cli.bench_temporal import task_rows

    opts = {"hidden_size": 8, "steps": 12, "n_train": 256, "n_val": 64, "n_test": 64, "train_steps": 3,
            "batch_size": 32, "lr": 0.01, "budget": 0.6}
    rows = task_rows("skip-lstm", "adding", data_dir=None, opts=opts, budgets=[0.6], repeats=1, log=lambda s: None)
    assert math.isnan(rows[0].budget)  # the trained θ comes first; 0.6 follows when the gate can reach it
    assert len(rows) in (1, 2)
    for r in rows:
        d = r.to_dict()
        assert d["kind"] == "adding" and d["steps"] == 12 and d["hidden_size"] == 8
        assert 0 <= d["accuracy"] <= 1 and 0 <= d["static_accuracy"] <= 1 and d["mse"] >= 0
        # simulate and execute give the same predictions, so the same within-tolerance accuracy
        assert d["simulate_accuracy"] == d["accuracy"]
        assert d["static_flops"] == 12 * 4 * 8 * (2 + 8) + 8
        assert math.isclose(d["theoretical_speedup"], d["static_flops"] / d["mean_flops"])
    calibrated = [r for r in rows if not math.isnan(r.budget)]
    for r in calibrated:
        assert abs(r.achieved_budget - r.budget) < 0.1


def test_task_rows_reject_methods_without_a_feature_model():
    import pytest

    from dynaneural.cli.bench_temporal import task_rows

    with pytest.raises(ValueError, match="Skip RNN"):
        task_rows("jump", "adding", data_dir=None, opts={}, budgets=[], repeats=1, log=lambda s: None)


def test_cli_parses_tasks():
    args = build_parser().parse_args(["bench", "temporal", "--method", "skip-lstm", "--no-timing",
                                      "--task", "adding", "fsdd"])
    assert args.task == ["adding", "fsdd"]


def test_kernel_rows_time_the_skip_lstm_step_kernels():
    from dynaneural.cli.bench_temporal import kernel_rows
    from dynaneural.layers.lstm import onednn_linear_available

    rows = kernel_rows(hidden=8, feat=4, rows=(4, 8), repeats=1)
    assert [r["rows"] for r in rows] == [4, 8]
    for r in rows:
        assert r["tanh_us"] > 0 and r["sigmoid_us"] > 0 and r["tanh_over_sigmoid_time"] > 0
        if onednn_linear_available():
            assert r["packed_gmacs"] > 0 and r["addmm_gmacs"] > 0


def test_seed_summary_averages_each_budget_over_seeds():
    from dynaneural.bench.rows import SpeedupRow
    from dynaneural.cli.bench_temporal import seed_summary

    def row(budget, acc, base, work, seed):
        return SpeedupRow(method="stop", batch_size=128, accuracy=acc, static_accuracy=base, mean_flops=1.0,
                          static_flops=2.0, theoretical_speedup=2.0, realized_speedup=1.0,
                          realized_over_theoretical=0.5, static_ms_per_sample=1.0, dynamic_ms_per_sample=1.0,
                          timed_samples=1, budget=budget, achieved_budget=work, extra={"seed": seed})
    rows = [row(math.nan, 0.80, 0.81, 0.55, 0), row(0.6, 0.79, 0.81, 0.58, 0),
            row(math.nan, 0.82, 0.80, 0.57, 1), row(0.6, 0.81, 0.80, 0.61, 1)]
    out = {r["budget"]: r for r in seed_summary(rows)}
    assert set(out) == {"trained", "0.6"}
    b = out["0.6"]
    assert b["seeds"] == [0, 1] and math.isclose(b["accuracy_mean"], 0.80)
    assert [round(d, 6) for d in b["delta_pp"]] == [-2.0, 1.0]
    assert math.isclose(b["delta_pp_mean"], -0.5) and math.isclose(b["delta_pp_std"], 2.1213203, rel_tol=1e-6)
    assert math.isclose(b["work_mean"], 0.595) and b["work_max"] == 0.61


def test_sst2_rows_give_the_early_stop_reader_right_padded_texts(tmp_path):
    import os
    from pathlib import Path

    from dynaneural.cli.bench_temporal import sst2_rows

    data_dir = Path(os.environ.get("DYNANEURAL_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))
    if not (data_dir / "sst2" / "train.tsv").is_file():
        import pytest

        pytest.skip(f"SST-2 not present under {data_dir}")
    lines: list[str] = []
    rows = sst2_rows("stop", data_dir=str(data_dir), epochs=1, train_limit=600, repeats=1, budgets=[0.6], seed=3,
                     model_kwargs={"hidden_size": 16, "embed_dim": 16}, val_split="sentences", log=lines.append)
    assert any("reads right-padded batches" in line for line in lines)
    assert len(rows) == 2 and all(r.extra["seed"] == 3 for r in rows)
    for r in rows:
        assert 0 < r.achieved_budget <= 1 and 0 <= r.accuracy <= 1 and r.mean_flops < r.static_flops * 1.05
        assert r.extra["simulate_accuracy"] == r.accuracy
