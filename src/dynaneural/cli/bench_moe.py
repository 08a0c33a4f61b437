"""``dynaneural bench moe``: the MoE layer's CPU throughput against a dense SwiGLU layer of the same active
parameter count and against HF transformers' ``MixtralSparseMoeBlock`` (same shape, same weights), for inference
and for a training step, plus 2-process expert parallelism against 1 process.

Every ratio is measured in one run, the two sides interleaved (``bench.timing.compare``): ``realized_speedup`` =
baseline time / MoE time = MoE throughput ÷ baseline throughput. ``theoretical_speedup`` = baseline FLOPs / MoE
FLOPs per token (for the dense baseline ≈ 1: same active parameters, plus the MoE's router). HF transformers is
optional (``pip install transformers``); without it its rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = ["register", "run_moe_bench"]


def _hf_block(moe: Any, implementation: str) -> Any:
    """HF's MixtralSparseMoeBlock with ``moe``'s weights (same layouts: fused (E, 2f, d) gate|up, (E, d, f) down)."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=moe.dim, intermediate_size=moe.hidden, num_local_experts=moe.num_experts,
                        num_experts_per_tok=moe.top_k, router_jitter_noise=0.0)
    if implementation != "eager":
        cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.w_gate_up)
        block.experts.down_proj.copy_(moe.w_down)
    return block


def run_moe_bench(*, tokens: int = 8192, dim: int = 256, hidden: int = 512, experts: int = 8, top_k: int = 2,
                  threads: list[int] | None = None, repeats: int = 15, train: bool = True, hf: bool = True,
                  distributed: bool = True, distributed_tokens: int | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the benchmark; returns (rows, notes)."""
    import torch

    from dynaneural.bench.timing import compare
    from dynaneural.sample_wise.moe import MoEFeedForward, SwiGLU

    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    moe = MoEFeedForward(dim, hidden, experts, top_k=top_k)
    dense = SwiGLU(dim, top_k * hidden)  # same active parameters: k experts of width f = one SwiGLU of width k·f
    x = torch.randn(tokens, dim)
    moe_flops = moe.router_flops() + top_k * moe.expert_flops()
    dense_flops = 3 * dim * top_k * hidden
    baselines: dict[str, Any] = {"dense_swiglu": dense}
    if hf:
        try:
            for impl in ("eager", "grouped_mm"):
                baselines[f"hf_mixtral_{impl}"] = _hf_block(moe, impl)
        except ImportError:
            notes.append("HF transformers is not installed: the MixtralSparseMoeBlock rows are skipped "
                         "(pip install transformers)")
        except Exception as e:  # noqa: BLE001 - an HF implementation that does not run here is reported, not fatal
            notes.append(f"HF MixtralSparseMoeBlock ({impl}) failed here: {type(e).__name__}: {e}")
    with torch.inference_mode():
        ref = moe(x).output
        diffs = {}
        for name, mod in baselines.items():
            if name.startswith("hf_"):
                diffs[name] = float((mod(x.view(1, tokens, dim)).view(tokens, dim) - ref).abs().max())
    prev = torch.get_num_threads()
    try:
        for nt in threads or [torch.get_num_threads()]:
            torch.set_num_threads(nt)
            for phase in (["inference", "train_step"] if train else ["inference"]):
                ours = _fn(moe, x, phase, kind="ours")
                for name, mod in baselines.items():
                    base = _fn(mod, x, phase, kind="hf" if name.startswith("hf_") else "dense")
                    cmp = compare(base, ours, repeats=repeats, warmup=2)
                    theo = (dense_flops if name == "dense_swiglu" else moe_flops) / moe_flops
                    target = {"dense_swiglu": 0.95}.get(name, 1.1) if phase == "inference" else math.nan
                    row = {"method": f"moe_e{experts}_top{top_k}", "baseline": name, "phase": phase, "threads": nt,
                           "batch_size": tokens, "accuracy": math.nan, "mean_flops": float(moe_flops),
                           "static_flops": float(dense_flops if name == "dense_swiglu" else moe_flops),
                           "theoretical_speedup": theo, "realized_speedup": cmp.speedup,
                           "realized_over_theoretical": cmp.speedup / theo,
                           "static_ms_per_sample": cmp.baseline_s * 1e3 / tokens,
                           "dynamic_ms_per_sample": cmp.candidate_s * 1e3 / tokens, "timed_samples": tokens,
                           "moe_tokens_per_s": tokens / cmp.candidate_s, "baseline_tokens_per_s": tokens / cmp.baseline_s,
                           "target": target, "target_met": (cmp.speedup >= target) if target == target else None,
                           "max_abs_diff_vs_ours": diffs.get(name, math.nan)}
                    rows.append(row)
                    log(f"threads={nt} {phase:10s} vs {name:22s}: MoE/baseline throughput {cmp.speedup:.3f} "
                        f"({row['moe_tokens_per_s']:.0f} vs {row['baseline_tokens_per_s']:.0f} tokens/s)")
    finally:
        torch.set_num_threads(prev)
    if distributed:
        from dynaneural.sample_wise.moe.distributed import check_expert_parallel_equivalence

        n = distributed_tokens or tokens
        rep = check_expert_parallel_equivalence(
            "moe_mlp_mnist", kwargs=dict(input_shape=[dim], dim=dim, hidden=hidden, num_experts=experts,
                                         top_k=top_k, depth=1),
            world_size=2, batch_size=n, repeats=5, threads=1)
        rows.append({"method": f"moe_e{experts}_top{top_k}", "baseline": "1_process", "phase": "expert_parallel",
                     "threads": 1, "batch_size": n, "world_size": 2, "tokens_per_s_1_process": rep.tokens_per_s_1,
                     "tokens_per_s_2_processes": rep.tokens_per_s_w,
                     "realized_speedup": rep.tokens_per_s_w / rep.tokens_per_s_1,
                     "identical": rep.ok(tol=1e-4), "max_logit_diff": rep.max_logit_diff,
                     "max_loss_diff": rep.max_loss_diff, "max_grad_diff": rep.max_grad_diff,
                     "max_param_diff": rep.max_param_diff, "decisions_equal": rep.decisions_equal})
        log(f"expert parallel, 2 gloo processes vs 1: {rep.tokens_per_s_w:.0f} vs {rep.tokens_per_s_1:.0f} "
            f"tokens/s; identical={rep.ok(tol=1e-4)} (max grad diff {rep.max_grad_diff:.2e})")
    return rows, notes


def _fn(mod: Any, x: Any, phase: str, *, kind: str) -> Callable[[], object]:
    import torch

    if phase == "inference":
        if kind == "hf":
            x3 = x.view(1, *x.shape)
            return lambda: _inference(mod, x3)
        if kind == "ours":
            return lambda: _inference(lambda t: mod(t).output, x)
        return lambda: _inference(mod, x)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)

    def step() -> None:
        mod.zero_grad(set_to_none=True)
        xg.grad = None
        if kind == "ours":
            res = mod(xg, mode="train")
            loss = (res.output * g).sum() + sum(res.aux_losses.values())
        elif kind == "hf":
            loss = (mod(xg.view(1, *xg.shape)).view_as(g) * g).sum()
        else:
            loss = (mod(xg) * g).sum()
        loss.backward()

    return step


def _inference(fn: Callable[[Any], Any], x: Any) -> Any:
    import torch

    with torch.inference_mode():
        return fn(x)


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator

    _maybe_reexec_with_tuned_allocator(args)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 1024), min(args.repeats, 3)
    rows, notes = run_moe_bench(tokens=args.tokens, dim=args.dim, hidden=args.hidden, experts=args.experts,
                                top_k=args.top_k, threads=threads, repeats=args.repeats, train=not args.no_train,
                                hf=not args.no_hf, distributed=not args.no_distributed,
                                distributed_tokens=args.distributed_tokens)
    timing = [r for r in rows if r["phase"] != "expert_parallel"]
    print(format_rows(timing, ["baseline", "phase", "threads", "realized_speedup", "target", "moe_tokens_per_s",
                               "baseline_tokens_per_s", "max_abs_diff_vs_ours"]))
    for note in notes:
        print("note:", note)
    if args.json:
        path = write_bench_json(args.json, rows, benchmark="moe", notes=notes,
                                shape={"tokens": args.tokens, "dim": args.dim, "expert_hidden": args.hidden,
                                       "experts": args.experts, "top_k": args.top_k})
        print(f"wrote {path}")
    return 0


def register(bsub: Any, *, common: Callable[[argparse.ArgumentParser], None],
             data_opts: Callable[[argparse.ArgumentParser], None]) -> None:
    p = bsub.add_parser("moe", help="MoE layer throughput vs a dense SwiGLU and HF Mixtral; 2-process expert "
                                    "parallelism vs 1 process")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="width of each expert's SwiGLU")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--threads", default=None, help="comma-separated torch thread counts (default: torch's)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers' MixtralSparseMoeBlock")
    p.add_argument("--no-distributed", action="store_true", help="skip the 2-process expert-parallel row")
    p.add_argument("--distributed-tokens", type=int, default=None, help="tokens of the 2-process run")
    p.add_argument("--quick", action="store_true", help="1024 tokens, 3 repeats (smoke run)")
    p.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/moe.json)")
    common(p)
    p.set_defaults(fn=cmd_bench_moe)
