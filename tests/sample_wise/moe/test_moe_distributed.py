"""Expert parallelism and DDP on 2 CPU processes (gloo) give the same results as 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dynaneural.sample_wise.moe.distributed import check_expert_parallel_equivalence


def test_expert_parallel_two_processes_equal_one_process():
    """One training step (outputs, loss, gradients, SGD update) and execute-mode decisions/cost after it."""
    rep = check_expert_parallel_equivalence("test_moe_transformer", world_size=2, batch_size=8, timeout_s=120)
    # every assertion prints the whole report: this test has failed intermittently in full runs (not alone)
    assert rep.decisions_equal, rep
    assert rep.max_logit_diff <= 1e-5 and rep.max_loss_diff <= 1e-5, rep
    assert rep.max_grad_diff <= 1e-5 and rep.max_param_diff <= 1e-5, rep
    assert rep.max_cost_diff == 0.0, rep
    assert rep.tokens_per_s_1 > 0 and rep.tokens_per_s_w > 0, rep


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_moe_mlp", "test_moe_transformer_ec", "test_moe_transformer_tokens",
                                  "test_moe_transformer_shared"])
def test_expert_parallel_other_models(name):
    assert check_expert_parallel_equivalence(name, world_size=2, batch_size=8).ok(tol=1e-5)


def _run(args, tmp, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    out = tmp / f"run{nproc}"
    cmd = launcher + ["-m", "dynaneural.engine.distributed", *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, timeout=240, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), out


def test_torchrun_ddp_training_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m dynaneural.engine.distributed` with experts sharded trains the same weights
    as the same command on one process (same global batches)."""
    args = ["--model", "test_moe_mlp", "--dataset", "digits", "--limit", "192", "--batch-size", "32",
            "--max-steps", "4", "--epochs", "1", "--lr", "0.05", "--expert-parallel"]
    one, dir1 = _run(args, tmp_path, 1)
    two, dir2 = _run(args, tmp_path, 2)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["steps"] == one["steps"] == 4
    assert two["history"][-1]["train_loss"] == pytest.approx(one["history"][-1]["train_loss"], abs=1e-5)
    assert two["test"]["accuracy"] == pytest.approx(one["test"]["accuracy"], abs=1e-9)
    assert two["test"]["mean_cost"] == pytest.approx(one["test"]["mean_cost"], rel=1e-12)
    full = load_file(dir1 / "last.safetensors")
    shards = [load_file(dir2 / f"rank{r}.safetensors") for r in range(2)]
    assert full.keys() == shards[0].keys()
    for k, v in full.items():
        other = torch.cat([s[k] for s in shards]) if ("w_gate_up" in k or "w_down" in k) else shards[0][k]
        torch.testing.assert_close(other, v, rtol=1e-4, atol=1e-5, msg=k)
        if "w_gate_up" not in k and "w_down" not in k:
            torch.testing.assert_close(shards[1][k], v, rtol=1e-4, atol=1e-5, msg=k)  # DDP kept replicas equal


def test_spawn_reports_workers_that_never_met(tmp_path):
    """A worker that dies before joining the process group is told apart from a hang after it (and retried)."""
    from dynaneural.sample_wise.moe.distributed import RendezvousTimeout, _equivalence_worker, _spawn

    with pytest.raises(RendezvousTimeout, match="joined the process group"):
        _spawn(_equivalence_worker, ({}, str(tmp_path)), 2, 60.0, str(tmp_path))  # empty spec: fails at once
