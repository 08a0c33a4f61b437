"""A seed study over several runs: the JSON is rewritten after every seed, and ``--from-json`` pools the seeds that
earlier runs of the same recipe measured (``run_recipe_bench_over_seeds``, shared by ``bench moe-accuracy`` and
``bench dynparams``). The bench itself is replaced by a fast stand-in that records which seeds it trained; the real
bench over seeds is run end to end in ``tests/sample_wise/moe/test_moe_accuracy_bench.py``."""

from __future__ import annotations

import json
import math

import pytest

from dynaneural.bench.rows import SpeedupRow
from dynaneural.cli import bench_moe_accuracy
from dynaneural.cli.main import main

GAINS = {0: 0.4, 1: -0.1, 2: 0.3, 3: 0.5}


@pytest.fixture
def fake_bench(monkeypatch):
    """``run_moe_accuracy_bench`` stand-in: one row per timed batch size, a gain that depends on the seed only."""
    trained: list[int] = []

    def run(recipe, *, data_dir=None, out_dir=None, log=print):
        seed = int(recipe.train["seed"])
        if seed == 99:
            raise RuntimeError("cut")
        trained.append(seed)
        rows = [SpeedupRow(method="moe_top1_of_8", batch_size=b, accuracy=0.8 + GAINS[seed] / 100,
                           mean_flops=1.0, static_flops=1.0, theoretical_speedup=1.0, realized_speedup=0.9,
                           realized_over_theoretical=0.9, static_ms_per_sample=1.0, dynamic_ms_per_sample=1.1,
                           timed_samples=8, static_accuracy=0.8, extra={"accuracy_gain_pp": GAINS[seed]})
                for b in (64, 256)]
        return {"rows": rows, "meta": {"train_seconds": 1.0 + seed}}

    monkeypatch.setattr(bench_moe_accuracy, "run_moe_accuracy_bench", run)
    return trained


COMMON = ["bench", "moe-accuracy", "--recipe", "moe_accuracy_mnist", "--no-allocator-tuning", "--no-progress"]


def test_speedup_row_round_trips_through_its_json_dict():
    row = SpeedupRow(method="m", batch_size=64, accuracy=0.9, mean_flops=2.0, static_flops=4.0,
                     theoretical_speedup=2.0, realized_speedup=1.8, realized_over_theoretical=0.9,
                     static_ms_per_sample=1.0, dynamic_ms_per_sample=0.5, timed_samples=128, budget=0.5,
                     static_accuracy=0.91, extra={"seed": 3, "accuracy_gain_pp": -1.0})
    back = SpeedupRow.from_dict(json.loads(json.dumps(row.to_dict())))
    assert json.dumps(back.to_dict()) == json.dumps(row.to_dict())  # NaN fields included (NaN != NaN)
    assert back.extra == row.extra and back.accuracy_loss_pp == pytest.approx(1.0) and math.isnan(back.budget_error)
    with pytest.raises(ValueError, match="not a bench row"):
        SpeedupRow.from_dict({"method": "m", "batch_size": 1})


def test_a_study_over_two_runs_trains_each_seed_once_and_pools_them(fake_bench, tmp_path):
    first, second = tmp_path / "seeds01.json", tmp_path / "seeds0123.json"
    assert main([*COMMON, "--seeds", "0", "1", "--json", str(first)]) == 0
    assert fake_bench == [0, 1]
    assert main([*COMMON, "--seeds", "0", "1", "2", "3", "--from-json", str(first), "--json", str(second)]) == 0
    assert fake_bench == [0, 1, 2, 3]  # seeds 0 and 1 were not trained again
    doc = json.loads(second.read_text())
    assert doc["seeds"] == [0, 1, 2, 3] and doc["complete"] and doc["seeds_requested"] == [0, 1, 2, 3]
    assert doc["seeds_from_json"] == {"0": str(first), "1": str(first)}
    assert doc["per_seed_meta"]["0"] == {"train_seconds": 1.0} and doc["per_seed_meta"]["3"] == {"train_seconds": 4.0}
    assert doc["rows"][:4] == json.loads(first.read_text())["rows"]  # the earlier rows, unchanged
    (s,) = doc["summary"].values()
    assert s["seeds"] == [0, 1, 2, 3] and s["gain_pp"] == pytest.approx([GAINS[k] for k in range(4)])
    assert s["gain_pp_mean"] == pytest.approx(sum(GAINS.values()) / 4) and s["gain_seeds_ahead"] == 3
    assert doc["study_digest"] == json.loads(first.read_text())["study_digest"]


def test_a_cut_study_keeps_the_seeds_it_finished(fake_bench, tmp_path):
    out = tmp_path / "cut.json"
    with pytest.raises(RuntimeError, match="cut"):
        main([*COMMON, "--seeds", "0", "2", "99", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [0, 2] and not doc["complete"] and doc["seeds_requested"] == [0, 2, 99]
    assert [r["seed"] for r in doc["rows"]] == [0, 0, 2, 2]
    assert doc["summary"]["moe_top1_of_8"]["gain_pp"] == pytest.approx([GAINS[0], GAINS[2]])
    assert not list(tmp_path.glob("*.tmp"))
    # the next run resumes from it
    assert main([*COMMON, "--seeds", "0", "2", "3", "--from-json", str(out), "--json", str(out)]) == 0
    assert fake_bench == [0, 2, 3]
    assert json.loads(out.read_text())["complete"]


def test_seed_study_refuses_to_pool_another_experiment_or_a_seed_twice(fake_bench, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main([*COMMON, "--seeds", "0", "--json", str(a)]) == 0
    with pytest.raises(SystemExit, match="another experiment"):  # the quick variant is another recipe
        main([*COMMON, "--quick", "--seeds", "0", "1", "--from-json", str(a)])
    with pytest.raises(SystemExit, match="another experiment"):
        main([*COMMON, "--recipe", "moe_accuracy_mnist_full", "--seeds", "0", "--from-json", str(a)])
    assert main([*COMMON, "--seeds", "0", "--json", str(b)]) == 0
    with pytest.raises(SystemExit, match="seed 0 is in both"):
        main([*COMMON, "--seeds", "0", "1", "--from-json", str(a), str(b)])
    with pytest.raises(SystemExit, match="repeats a seed"):
        main([*COMMON, "--seeds", "1", "1"])
    with pytest.raises(SystemExit, match="give --seeds too"):
        main([*COMMON, "--from-json", str(a)])
    (tmp_path / "single.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="not the JSON of a --seeds run"):
        main([*COMMON, "--seeds", "0", "--from-json", str(tmp_path / "single.json")])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read"):
        main([*COMMON, "--seeds", "0", "--from-json", str(tmp_path / "broken.json")])
    assert fake_bench == [0, 0]
