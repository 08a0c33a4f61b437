"""``dynaneural bench regions``: glance-and-focus (GFNet) and resolution-adaptive (RANet) nets vs a static family.

Trains GFNet (per-step cross-entropy + REINFORCE patch policy, :meth:`GFNet.loss`), RANet (the multi-exit loss)
and a static family — RANet truncated to its first k resolutions, each trained on its own (``exits="last"``) —
on the recipe's dataset (with ``options.augment``; GFNet with ``options.gfnet_train`` on top). GFNet's confidence
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
from pathlib import Path
from typing import Any

import torch

__all__ = ["region_dominance", "register", "run_region_bench"]


def run_region_bench(recipe: Any, *, data_dir: str | None = None, out_dir: str | Path | None = None,
                     log: Any = print) -> dict[str, Any]:
    """Train, calibrate and time GFNet, RANet and the static family; returns ``{rows, meta}``.

    With ``out_dir`` every training checkpoints into ``<out_dir>/checkpoints/<tag>-<digest of its settings>``
    (:func:`~dynaneural.bench.cache.training_dir`): a cut run resumes, and a finished one is loaded, so re-timing
    costs no training.
    """
    from dynaneural.bench.cache import training_dir
    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.calibration import calibrate_exits
    from dynaneural.compute.flops import static_flops
    from dynaneural.data import augmentation, load_dataset
    from dynaneural.engine import TrainConfig, evaluate, train
    from dynaneural.registry import create_model
    from dynaneural.spatial_wise.region.gfnet import StaticGlance

    opts = recipe.options
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    bench = recipe.bench
    budgets = list(recipe.calibration.budgets)
    seed = int(recipe.train.get("seed", 0))
    augment_name = opts.get("augment")
    augment = augmentation(augment_name)

    def fit(model: torch.nn.Module, tag: str, name: str, kwargs: dict[str, Any], *, loss_fn: Any = None,
            overrides: dict[str, Any] | None = None) -> None:
        """Train on the recipe's settings with ``overrides`` (e.g. ``options.gfnet_train``) on top, resumable."""
        settings = {**recipe.train, **(overrides or {}), "progress": False}
        parts = (name, kwargs, recipe.data, recipe.dataset, settings) + ((augment_name,) if augment_name else ())
        ckpt = training_dir(out_dir, tag, *parts)
        train(model, train_x=data.train_x, train_y=data.train_y,
              config=TrainConfig.from_dict({**settings, "checkpoint_dir": ckpt}), loss_fn=loss_fn, augment=augment)
        model.eval()

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ranet = create_model(recipe.model, **recipe.model_kwargs)
    fit(ranet, "ranet", recipe.model, dict(recipe.model_kwargs))
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
        kw = {**recipe.model_kwargs, "num_stages": int(k), "exits": "last"}
        m = create_model(recipe.model, seed=seed, **kw)
        fit(m, f"static{k}", recipe.model, kw)
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
    gf_name, gf_kw = opts.get("gfnet_model", "gfnet_mnist"), dict(opts.get("gfnet_kwargs", {}))
    gf = create_model(gf_name, seed=seed, **gf_kw)
    fit(gf, "gfnet", gf_name, gf_kw, loss_fn=gf.loss, overrides=opts.get("gfnet_train"))
    if opts.get("static_glance", True):  # GFNet's own design without focus steps, trained alone (same settings)
        torch.manual_seed(seed)
        glance = StaticGlance(gf.cfg)
        fit(glance, "glance", f"{gf_name}:glance", gf_kw, overrides=opts.get("gfnet_train"))
        acc = evaluate(glance, data.test_x, data.test_y).accuracy
        add("static_glance", glance, acc=acc, flops=static_flops(glance, data.test_x[:1]), budget=1.0,
            extra={"family": "static", "stages": 0})
    with gf.all_on():
        gf_full = evaluate(gf, data.test_x, data.test_y, mode="execute").accuracy
    log(f"GFNet (all steps): accuracy {gf_full:.4f}, {gf.static_cost() / 1e6:.2f} MFLOPs")
    # GFNet's cheapest path is the glance (a third of its FLOPs with two focus steps), so it has its own budgets.
    for b in opts.get("gfnet_budgets", budgets):
        try:
            gf.calibrate(data.val_x[:2000], budget=float(b))
        except ValueError as e:
            log(f"  GFNet budget {b}: {e}")
            continue
        res = evaluate(gf, data.test_x, data.test_y, mode="execute")
        add("gfnet", lambda xb: gf(xb, mode="execute"), acc=res.accuracy, flops=float(res.mean_cost), budget=b,
            extra={"family": "dynamic", "gfnet_all_steps_accuracy": gf_full, "threshold": float(gf.threshold)})
    return {"rows": rows, "meta": {"dataset": recipe.dataset, "train_samples": int(data.train_x.shape[0]),
                                   "reference": "static RANet (all resolutions)", "seconds": time.perf_counter() - t0,
                                   "dominance": region_dominance(rows)}}


def region_dominance(rows: list[Any]) -> dict[str, Any]:
    """Per dynamic method and timed batch size: does its curve beat the static family at equal measured time?

    :func:`dynaneural.bench.pipeline.dominance` with every row's time relative to the common reference (the full
    static RANet), ``1 / realized_speedup``; the family is every ``static`` row of that batch size, the full network
    included.
    """
    from dynaneural.bench.pipeline import dominance

    out: dict[str, Any] = {}
    for bs in sorted({r.batch_size for r in rows}):
        at = [r.to_dict() for r in rows if r.batch_size == bs]
        static = [{**r, "relative_time": 1.0 / r["realized_speedup"]} for r in at if r["family"] == "static"]
        for method in dict.fromkeys(r["method"] for r in at if r["family"] == "dynamic"):
            out[f"{method}@{bs}"] = dominance([r for r in at if r["method"] == method], static)
    return out


def cmd_bench_regions(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator, resolve_recipe

    _maybe_reexec_with_tuned_allocator(args)
    torch.set_num_threads(args.threads)
    recipe = resolve_recipe(args, prefix="regions")
    out = run_region_bench(recipe, data_dir=args.data_dir, out_dir=args.out or f"runs/bench-{recipe.name}",
                           log=lambda s: print(s, flush=True))
    print(format_rows(out["rows"], ["method", "budget", "batch_size", "accuracy", "mean_flops",
                                    "dynamic_ms_per_sample", "theoretical_speedup", "realized_speedup"]))
    for key, d in out["meta"]["dominance"].items():
        margins = ", ".join(f"{m['margin_pp']:+.2f}" for m in d["points"])
        print(f"{key}: {'dominates' if d['dominates'] else 'does not dominate'} the static family at equal measured "
              f"time (margins, pp: {margins})")
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
    p.add_argument("--out", default=None, help="run folder whose checkpoints/ keep every training (resumed when cut, "
                                               "reused when run again); default runs/bench-<recipe>")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_regions)
