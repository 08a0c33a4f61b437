"""``dynaneural bench regions``: glance-and-focus (GFNet) and resolution-adaptive (RANet) nets vs a static family.

Trains GFNet (per-step cross-entropy + REINFORCE patch policy, :meth:`GFNet.loss`), RANet (the multi-exit loss)
and a static family — RANet truncated to its first k resolutions, each trained on its own (``exits="last"``) —
on the recipe's dataset (GFNet with the recipe's ``options.gfnet_train`` settings on top). GFNet's confidence
threshold (:meth:`GFNet.calibrate`) and RANet's exit thresholds (:func:`~dynaneural.calibration.calibrate_exits`)
are calibrated to each budget (fraction of the method's own static twin) on the validation split. Every row is a
:class:`~dynaneural.bench.rows.SpeedupRow` timed interleaved against the same reference — the full static RANet (all
resolutions, its static twin) — so all methods and static members sit on one accuracy-vs-measured-time axis
(``dynamic_ms_per_sample``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

__all__ = ["register", "run_region_bench"]


def _train(model: torch.nn.Module, recipe: Any, data: Any, *, loss_fn: Any = None,
           overrides: dict[str, Any] | None = None) -> None:
    """Train on the recipe's settings, with ``overrides`` (e.g. the recipe's ``options.gfnet_train``) on top."""
    from dynaneural.engine import TrainConfig, train

    cfg = TrainConfig.from_dict({**recipe.train, **(overrides or {}), "progress": False})
    train(model, train_x=data.train_x, train_y=data.train_y, config=cfg, loss_fn=loss_fn)
    model.eval()


def run_region_bench(recipe: Any, *, data_dir: str | None = None, log: Any = print) -> dict[str, Any]:
    """Train, calibrate and time GFNet, RANet and the static family; returns ``{rows, meta}``."""
    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.calibration import calibrate_exits
    from dynaneural.data import load_dataset
    from dynaneural.engine import evaluate
    from dynaneural.registry import create_model

    opts = recipe.options
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    bench = recipe.bench
    budgets = list(recipe.calibration.budgets)
    torch.manual_seed(int(recipe.train.get("seed", 0)))
    t0 = time.perf_counter()
    ranet = create_model(recipe.model, **recipe.model_kwargs)
    _train(ranet, recipe, data)
    ref = ranet.to_static().eval()
    ref_flops = ranet.cost_profile().static_total
    with ranet.all_on():
        ref_acc = evaluate(ranet, data.test_x, data.test_y, mode="execute").accuracy
    log(f"RANet static twin: accuracy {ref_acc:.4f}, {ref_flops / 1e6:.2f} MFLOPs ({time.perf_counter() - t0:.0f} s)")
    x_time = data.test_x[: bench.timed_samples]
    rows: list[SpeedupRow] = []

    def add(method: str, fn: Any, *, acc: float, flops: float, budget: float, extra: dict[str, Any]) -> None:
        for bs in bench.batch_sizes:
            xs = x_time if bs > 1 else x_time[: bench.timed_samples_batch1]
            t = time_against_static(ref, fn, xs, batch_size=bs, repeats=bench.repeats)
            theo = ref_flops / flops
            rows.append(SpeedupRow(method=method, batch_size=bs, accuracy=acc, mean_flops=flops, static_flops=ref_flops,
                                   theoretical_speedup=theo, realized_over_theoretical=t["realized_speedup"] / theo,
                                   budget=budget, achieved_budget=flops / ref_flops, static_accuracy=ref_acc, **t,
                                   extra=extra))
            log(f"  {method} budget {budget:g} batch {bs}: accuracy {acc:.4f}, {flops / 1e6:.2f} MFLOPs, "
                f"realized {t['realized_speedup']:.2f}× (theoretical {theo:.2f}×)")

    # the static family: the first k resolutions, each trained on its own
    for k in opts.get("static_stages", [1, 2]):
        m = create_model(recipe.model, seed=int(recipe.train.get("seed", 0)), **recipe.model_kwargs,
                         num_stages=int(k), exits="last")
        _train(m, recipe, data)
        acc = evaluate(m, data.test_x, data.test_y, mode="execute").accuracy
        add(f"static_ranet_{k}", m.to_static().eval(), acc=acc, flops=m.cost_profile().static_total, budget=1.0,
            extra={"family": "static", "stages": int(k)})
    add("static_ranet_full", ref, acc=ref_acc, flops=ref_flops, budget=1.0, extra={"family": "static", "stages": -1})
    # RANet: calibrated exits
    for b in budgets:
        calibrate_exits(ranet, data.val_x, data.val_y, budget=float(b), unit="fraction")
        res = evaluate(ranet, data.test_x, data.test_y, mode="execute")
        add("ranet", lambda xb: ranet(xb, mode="execute"), acc=res.accuracy, flops=float(res.mean_cost), budget=b,
            extra={"family": "dynamic", "exit_fraction": res.exit_fraction})
    # GFNet
    gf = create_model(opts.get("gfnet_model", "gfnet_mnist"), seed=int(recipe.train.get("seed", 0)),
                      **opts.get("gfnet_kwargs", {}))
    _train(gf, recipe, data, loss_fn=gf.loss, overrides=opts.get("gfnet_train"))
    with gf.all_on():
        gf_full = evaluate(gf, data.test_x, data.test_y, mode="execute").accuracy
    log(f"GFNet (all steps): accuracy {gf_full:.4f}, {gf.static_cost() / 1e6:.2f} MFLOPs")
    for b in budgets:
        try:
            gf.calibrate(data.val_x[:2000], budget=float(b))
        except ValueError as e:
            log(f"  GFNet budget {b}: {e}")
            continue
        res = evaluate(gf, data.test_x, data.test_y, mode="execute")
        add("gfnet", lambda xb: gf(xb, mode="execute"), acc=res.accuracy, flops=float(res.mean_cost), budget=b,
            extra={"family": "dynamic", "gfnet_all_steps_accuracy": gf_full, "threshold": float(gf.threshold)})
    return {"rows": rows, "meta": {"dataset": recipe.dataset, "train_samples": int(data.train_x.shape[0]),
                                   "reference": "static RANet (all resolutions)", "seconds": time.perf_counter() - t0}}


def cmd_bench_regions(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator, resolve_recipe

    _maybe_reexec_with_tuned_allocator(args)
    torch.set_num_threads(args.threads)
    recipe = resolve_recipe(args, prefix="regions")
    out = run_region_bench(recipe, data_dir=args.data_dir, log=lambda s: print(s, flush=True))
    print(format_rows(out["rows"], ["method", "budget", "batch_size", "accuracy", "mean_flops",
                                    "dynamic_ms_per_sample", "theoretical_speedup", "realized_speedup"]))
    if args.json:
        path = write_bench_json(args.json, out["rows"], recipe=recipe.name, **out["meta"])
        print(f"wrote {path}", file=sys.stderr)
    return 0


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    from dynaneural.cli.main import add_dataset_option

    p = bsub.add_parser("regions", help="glance-and-focus (GFNet) and resolution-adaptive (RANet) vs static nets")
    add_dataset_option(p, default="fashion-mnist", choices=["mnist", "fashion-mnist", "cifar10"])
    p.add_argument("--recipe", default=None, help="default: regions_<dataset>")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (timing is per thread count)")
    p.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/regions_fashion_mnist.json)")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_regions)
