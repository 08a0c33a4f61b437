"""``dynaneural bench halting`` end to end on a smoke-sized recipe (slow: trains for a few seconds)."""

import json

import pytest

from dynaneural.cli.main import main


@pytest.mark.slow
@pytest.mark.parametrize("method", ["act", "pondernet", "none"])
def test_bench_halting_quick_writes_rows(tmp_path, method):
    out = tmp_path / "rows.json"
    rc = main(["bench", "halting", "--task", "parity", "--method", method, "--quick", "--extrapolate",
               "--no-allocator-tuning", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    row = doc["rows"][0]
    for key in ("method", "batch_size", "accuracy", "mean_flops", "static_flops", "theoretical_speedup",
                "realized_speedup", "realized_over_theoretical", "sequence_error", "mean_steps",
                "extrapolation_sequence_error", "n_bits"):
        assert key in row, key
    assert row["method"] == method and row["extrapolation_samples"] > 0
