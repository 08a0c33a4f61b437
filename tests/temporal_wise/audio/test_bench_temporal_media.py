"""Smoke test of ``dynaneural bench temporal-media`` (quick recipes; slow: trains for an epoch)."""

import json

import pytest

from dynaneural.cli.main import main


@pytest.mark.slow
@pytest.mark.parametrize("task", ["audio", "fusion"])
def test_bench_quick_writes_rows(task, tmp_path, require_fsdd):
    out = tmp_path / f"{task}.json"
    assert main(["bench", "temporal-media", "--task", task, "--quick", "--no-progress", "--no-allocator-tuning",
                 "--json", str(out), "--out", str(tmp_path / "run")]) == 0
    doc = json.loads(out.read_text())
    row = doc["rows"][0]
    for key in ("accuracy", "static_accuracy", "theoretical_speedup", "realized_speedup", "mean_flops"):
        assert key in row
    assert row["theoretical_speedup"] > 1.0


@pytest.fixture
def require_fsdd():
    import os
    from pathlib import Path

    root = Path(os.environ.get("DYNANEURAL_DATA", ""))
    if not (root / "fsdd" / "recordings" / "0_george_0.wav").is_file():
        pytest.skip("FSDD not present")
