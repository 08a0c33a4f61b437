"""The shared bench row, its JSON file and table."""

import json
import math

import torch

from dynaneural.bench.rows import SpeedupRow, format_rows, time_against_static, write_bench_json


def _row(**kw):
    base = dict(method="m", batch_size=64, accuracy=0.9, static_accuracy=0.91, mean_flops=50.0, static_flops=100.0,
                theoretical_speedup=2.0, realized_speedup=1.8, realized_over_theoretical=0.9,
                static_ms_per_sample=1.0, dynamic_ms_per_sample=0.55, timed_samples=128, extra={"k": 3})
    return SpeedupRow(**{**base, **kw})


def test_row_dict_flattens_extra_and_reports_loss(tmp_path):
    d = _row().to_dict()
    assert d["k"] == 3 and "extra" not in d
    assert math.isclose(d["accuracy_loss_pp"], 1.0)
    path = write_bench_json(tmp_path / "x" / "b.json", [_row(), {"method": "raw"}], task="t")
    doc = json.loads(path.read_text())
    assert doc["task"] == "t" and doc["rows"][0]["method"] == "m" and doc["rows"][1] == {"method": "raw"}
    assert {"library_version", "torch_version", "threads", "allocator", "command"} <= doc.keys()
    table = format_rows([_row()])
    assert "realized_speedup" in table.splitlines()[0] and "1.8" in table


def test_time_against_static_returns_ratio_fields():
    x = torch.randn(32, 8)
    lin = torch.nn.Linear(8, 8)
    r = time_against_static(lin, lin, x, batch_size=16, repeats=3, warmup=1)
    assert r["timed_samples"] == 32 and r["realized_speedup"] > 0 and r["static_ms_per_sample"] > 0
