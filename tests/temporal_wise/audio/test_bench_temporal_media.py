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


@pytest.mark.slow
def test_bench_video_quick_times_the_stream(tmp_path, require_mnist):
    out = tmp_path / "video.json"
    assert main(["bench", "temporal-media", "--task", "video", "--quick", "--no-progress", "--no-allocator-tuning",
                 "--json", str(out), "--out", str(tmp_path / "run")]) == 0
    rows = json.loads(out.read_text())["rows"]
    ada = [r for r in rows if r["method"].startswith("adaframe")]
    assert ada and all(r["realized_speedup_stream"] > 0 and "stream_ms_per_sample" in r for r in ada)


@pytest.fixture
def require_fsdd():
    import os
    from pathlib import Path

    root = Path(os.environ.get("DYNANEURAL_DATA", ""))
    if not (root / "fsdd" / "recordings" / "0_george_0.wav").is_file():
        pytest.skip("FSDD not present")


@pytest.mark.slow
def test_bench_seeds_and_checkpoint_reuse(tmp_path, require_fsdd):
    out = tmp_path / "fusion.json"
    args = ["bench", "temporal-media", "--task", "fusion", "--quick", "--no-progress", "--no-allocator-tuning",
            "--json", str(out), "--out", str(tmp_path / "run"), "--seeds", "0", "1"]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert sorted({r["seed"] for r in doc["rows"]}) == [0, 1]
    assert doc["seeds"] == [0, 1] and doc["seed_summary"][0]["seeds"] == [0, 1]
    ckpts = sorted(p.parent.name for p in (tmp_path / "run").rglob("last.safetensors"))
    assert len(ckpts) == 2 and ckpts[0] != ckpts[1]  # one training per seed, different digests
    first = {s: m["train_s"] for s, m in doc["per_seed"].items()}
    assert main(args) == 0  # the re-run loads the finished trainings instead of training again
    again = json.loads(out.read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in doc["rows"]]
    assert all(again["per_seed"][s]["train_s"] < first[s] for s in first)


def test_seed_summary_statistics():
    from types import SimpleNamespace

    from dynaneural.cli.bench_temporal_media import seed_summary

    rows = [SimpleNamespace(method="m", budget=0.5, batch_size=64, accuracy=a, static_accuracy=s,
                            realized_speedup=r, theoretical_speedup=2.0, extra={"seed": i})
            for i, (a, s, r) in enumerate([(0.80, 0.81, 1.5), (0.78, 0.81, 1.7), (0.82, 0.81, 1.6)])]
    (summary,) = seed_summary(rows)
    assert summary["seeds"] == [0, 1, 2]
    assert summary["delta_pp"] == pytest.approx([-1.0, -3.0, 1.0])
    assert summary["delta_pp_mean"] == pytest.approx(-1.0) and summary["delta_pp_worst"] == pytest.approx(-3.0)
    assert summary["delta_pp_std"] == pytest.approx(2.0)
    assert summary["realized_speedup_mean"] == pytest.approx(1.6)


@pytest.fixture
def require_mnist():
    import os
    from pathlib import Path

    root = Path(os.environ.get("DYNANEURAL_DATA", ""))
    if not (root / "mnist").is_dir():
        pytest.skip("MNIST not present")
