"""``dynaneural bench halting``: ACT / PonderNet / no halting on the parity task, as JSON speed-up rows.

One run trains the recipe's model (``halting_<method>_parity``) on parity vectors, scores it on the test split
(k ≤ ``train_max_nonzero`` non-zeros) and, with ``--extrapolate`` (train on k ≤ n_bits/2), on the
extrapolation split (k > n_bits/2), calibrates the halting knob (ACT's ε, PonderNet's cumulative threshold) to
each budget of the recipe on the validation split, and times execute mode against the static twin (the network
unrolled for the maximum number of steps) at each batch size, interleaved in one run. ``--method none`` is the
same ACT network with one ponder step (no halting): the baseline that should stay near chance.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run_halting_bench", "steps_by_nonzero"]


def _rows_for(model: Any, static: Any, *, method: str, setting: str, knob: float, budget: float, data: Any,
              batch_sizes: list[int], timed: tuple[int, int], repeats: int, static_acc: float, static_cost: float,
              extra: dict[str, Any]) -> list[Any]:
    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.sample_wise.halting.parity import evaluate_halting

    test = evaluate_halting(model, data.test_x, data.test_y)
    ext = evaluate_halting(model, data.extra_x, data.extra_y)
    model.eval()
    rows = []
    for bs in batch_sizes:
        n = timed[1] if bs == 1 else timed[0]
        t = time_against_static(static, lambda xb: model(xb, mode="execute"), data.test_x[:n], batch_size=bs,
                                repeats=repeats)
        theo = static_cost / test["mean_flops"]
        rows.append(SpeedupRow(
            method=method, batch_size=bs, accuracy=test["accuracy"], mean_flops=test["mean_flops"],
            static_flops=static_cost, theoretical_speedup=theo, realized_speedup=t["realized_speedup"],
            realized_over_theoretical=t["realized_speedup"] / theo,
            static_ms_per_sample=t["static_ms_per_sample"], dynamic_ms_per_sample=t["dynamic_ms_per_sample"],
            timed_samples=t["timed_samples"], budget=budget, unit="fraction",
            achieved_budget=test["mean_flops"] / static_cost,
            budget_error=(test["mean_flops"] / static_cost - budget) if not math.isnan(budget) else math.nan,
            static_accuracy=static_acc,
            extra={"setting": setting, "knob": knob, "sequence_error": test["sequence_error"],
                   "mean_steps": test["mean_steps"], "max_steps_taken": test["max_steps"],
                   "ponder_cost": test["ponder_cost"], "extrapolation_sequence_error": ext["sequence_error"],
                   "extrapolation_mean_steps": ext["mean_steps"], "extrapolation_samples": ext["samples"],
                   **extra}))
    return rows


def steps_by_nonzero(model: Any, x: Any, y: Any, *, batch_size: int = 1000) -> dict[int, dict[str, float]]:
    """Mean ponder steps and sequence error of ``model`` (execute mode) for each number of non-zero entries."""
    import torch

    steps, correct = [], []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            out = model(x[i:i + batch_size], mode="execute")
            steps.append(out.decisions["steps"].double())
            correct.append((out.logits.argmax(1) == y[i:i + batch_size]).double())
    s, c, k = torch.cat(steps), torch.cat(correct), (x != 0).sum(1)
    return {int(v): {"mean_steps": float(s[k == v].mean()), "sequence_error": 1.0 - float(c[k == v].mean()),
                     "samples": int((k == v).sum())} for v in k.unique().tolist()}


def _plot_steps(by_k: dict[int, dict[str, float]], *, top: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(by_k)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ks, [by_k[k]["mean_steps"] for k in ks], "o-")
    ax[0].set_xlabel("non-zero entries")
    ax[0].set_ylabel("mean ponder steps")
    ax[1].plot(ks, [100 * by_k[k]["sequence_error"] for k in ks], "o-")
    ax[1].set_xlabel("non-zero entries")
    ax[1].set_ylabel("sequence error (%)")
    for a in ax:
        a.axvline(top + 0.5, color="grey", ls="--", lw=1)  # right of it: never seen in training
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_halting_bench(*, method: str, recipe_name: str | None = None, quick: bool = False, extrapolate: bool = False,
                      steps: int | None = None, out_json: str | None = None) -> list[dict[str, Any]]:
    """Train, calibrate and time one halting method on parity; returns (and writes) the rows."""
    import torch
    import torch.nn.functional as F

    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.compute.flops import static_flops
    from dynaneural.engine import TrainConfig, train
    from dynaneural.recipes import load_recipe
    from dynaneural.registry import create_model
    from dynaneural.sample_wise.halting import (
        AdaptiveComputationTime,
        PonderNet,
        PonderNetLoss,
        calibrate_act_eps,
        calibrate_pondernet_threshold,
    )
    from dynaneural.sample_wise.halting.parity import make_parity

    recipe = load_recipe(recipe_name or f"halting_{method}_parity")
    if quick:
        recipe = recipe.quick_variant()
    opts = {"n_bits": 8, "train_steps": 4000, "val_size": 2000, "test_size": 4000, "seed": 0, **recipe.options}
    unknown = set(opts) - {"n_bits", "train_steps", "val_size", "test_size", "seed"}
    if unknown:
        raise ValueError(f"recipe {recipe.name}: unknown options {sorted(unknown)}")
    n_bits = int(opts["n_bits"])
    cfg = TrainConfig.from_dict({**recipe.train, "progress": False, "device": "cpu"})
    train_steps = int(steps or opts["train_steps"])
    top = n_bits // 2 if extrapolate else n_bits
    data = make_parity(n_bits=n_bits, train_size=train_steps * cfg.batch_size, val_size=int(opts["val_size"]),
                       test_size=int(opts["test_size"]), train_max_nonzero=top, seed=int(opts["seed"]))
    model = create_model(recipe.model, seed=cfg.seed, **{**recipe.model_kwargs, "n_bits": n_bits})
    if isinstance(model, PonderNet):
        loss_fn: Any = PonderNetLoss()
    else:
        def loss_fn(out: Any, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": F.cross_entropy(out.logits, y), "correct/final": (out.logits.argmax(1) == y).sum()}
    print(f"training {recipe.model} on {n_bits}-bit parity (k <= {top}) for {train_steps} steps", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train(model, train_x=data.train_x, train_y=data.train_y, config=cfg, loss_fn=loss_fn)
    train_seconds = time.perf_counter() - t0
    model.eval()
    static = model.to_static().eval()
    static_cost = static_flops(static, data.test_x[:1])
    with torch.inference_mode():
        static_acc = float((static(data.test_x).argmax(1) == data.test_y).float().mean())
    bs_list = [int(b) for b in recipe.bench.batch_sizes]
    timed = (int(recipe.bench.timed_samples), int(recipe.bench.timed_samples_batch1))
    repeats = int(recipe.bench.repeats)
    extra = {"task": "parity", "n_bits": n_bits, "train_max_nonzero": top, "train_steps": train_steps,
             "train_seconds": round(train_seconds, 1), "max_steps": model.max_steps, "model": recipe.model}
    rows: list[Any] = []
    not_reached: list[dict[str, Any]] = []
    if isinstance(model, AdaptiveComputationTime):
        setting = f"trained eps={model.eps:g}" if model.max_steps > 1 else "one step, no halting"
        rows += _rows_for(model, static, method=method, setting=setting, knob=model.eps,
                          budget=math.nan, data=data, batch_sizes=bs_list, timed=timed, repeats=repeats,
                          static_acc=static_acc, static_cost=static_cost, extra={**extra, "halting": "act"})
        trained_eps = model.eps
        if model.max_steps > 1:
            for budget in recipe.calibration.budgets:
                try:
                    cal = calibrate_act_eps(model, data.val_x, budget=budget)
                except ValueError as e:
                    not_reached.append({"budget": budget, "reason": str(e)})
                    continue
                rows += _rows_for(model, static, method=method, setting="calibrated eps", knob=cal.knob,
                                  budget=budget, data=data, batch_sizes=bs_list, timed=timed, repeats=repeats,
                                  static_acc=static_acc, static_cost=static_cost,
                                  extra={**extra, "halting": "act", "val_fraction": cal.mean_cost})
            model.eps = trained_eps
    else:
        assert isinstance(model, PonderNet)
        for rule in ("sample", "threshold"):
            model.halting = rule
            rows += _rows_for(model, static, method=method,
                              setting=f"{rule}" + (f" q={model.threshold:g}" if rule == "threshold" else ""),
                              knob=model.threshold if rule == "threshold" else math.nan, budget=math.nan,
                              data=data, batch_sizes=bs_list, timed=timed, repeats=repeats, static_acc=static_acc,
                              static_cost=static_cost, extra={**extra, "halting": rule})
        trained_q = model.threshold
        for budget in recipe.calibration.budgets:
            try:
                cal = calibrate_pondernet_threshold(model, data.val_x, budget=budget)
            except ValueError as e:
                not_reached.append({"budget": budget, "reason": str(e)})
                continue
            rows += _rows_for(model, static, method=method, setting="calibrated threshold", knob=cal.knob,
                              budget=budget, data=data, batch_sizes=bs_list, timed=timed, repeats=repeats,
                              static_acc=static_acc, static_cost=static_cost,
                              extra={**extra, "halting": "threshold", "val_fraction": cal.mean_cost})
        model.threshold = trained_q
    model.eval()
    by_k = steps_by_nonzero(model, torch.cat([data.test_x, data.extra_x]), torch.cat([data.test_y, data.extra_y]))
    print(format_rows(rows, ["method", "setting", "budget", "batch_size", "sequence_error", "mean_steps",
                             "ponder_cost", "extrapolation_sequence_error", "extrapolation_mean_steps",
                             "theoretical_speedup", "realized_speedup", "realized_over_theoretical"]))
    if not_reached:
        print("budgets not reached:", not_reached)
    suffix = "_extrapolate" if extrapolate else ""
    path = Path(out_json or f"benchmarks/halting_{method}_parity{suffix}.json")
    write_bench_json(path, rows, recipe=recipe.name, not_reached=not_reached, static_accuracy=static_acc,
                     steps_by_nonzero=by_k)
    _plot_steps(by_k, top=top, title=f"{method} on {n_bits}-bit parity (trained on k <= {top})",
                path=path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return [r.to_dict() for r in rows]


def _cmd(args: argparse.Namespace) -> int:
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator

    _maybe_reexec_with_tuned_allocator(args)
    run_halting_bench(method=args.method, recipe_name=args.recipe, quick=args.quick, extrapolate=args.extrapolate,
                      steps=args.steps, out_json=args.json)
    return 0


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    """Add ``bench halting`` to the ``bench`` subcommands."""
    p = bsub.add_parser("halting", help="ACT / PonderNet on the parity task: error, ponder steps, speed-up")
    p.add_argument("--task", default="parity", choices=["parity"])
    p.add_argument("--method", required=True, choices=["act", "pondernet", "none"])
    p.add_argument("--recipe", default=None, help="default: halting_<method>_parity")
    p.add_argument("--extrapolate", action="store_true",
                   help="train on at most n_bits/2 non-zeros and also score vectors with more")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's training steps")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    p.add_argument("--json", default=None, help="default: benchmarks/halting_<method>_parity[_extrapolate].json")
    data_opts(p)
    common(p)
    p.set_defaults(fn=_cmd)
