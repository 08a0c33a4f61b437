"""``dynaneural bench dynparams``: dynamic parameters and dynamic connections against the static CNN.

Trains the static CNN of the backbone architecture and, with the same recipe, CondConv, dynamic convolution,
the hypernetwork and squeeze-excitation variants of it, plus the gated dense block (calibrated to each budget).
Each row holds test accuracy (execute mode), mean FLOPs from the ledger, the static network's FLOPs and accuracy,
theoretical speed-up (static / dynamic FLOPs: below 1 for dynamic parameters, which add a little compute) and
the realized speed-up (static CNN, BN folded, against the model in execute mode, interleaved in one run), plus
``simulate_execute_max_abs_diff`` (kernel mixing + one grouped conv against every kernel's conv + mixing).

The static CNN of the same widths costs ~5 % fewer FLOPs than CondConv / dynamic convolution (their routing and
kernel mixing). With ``options.equal_flops_widths`` a second static CNN, widened until its FLOPs are at least the
dynamic models', is trained too; every row then also carries ``accuracy_gain_vs_equal_flops_pp``, the comparison
the papers make ("at equal FLOPs"). With ``--out`` every training checkpoints into a folder keyed by its settings
(``bench.cache.training_dir``): a cut run resumes, a finished one is reused. ``options.augment: cifar`` trains
with random crops and flips.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run_dynparams_bench"]

_METHODS = {"condconv": "condconv", "dynamic_conv": "dynamic_conv", "hypernetwork": "hypernetwork",
            "squeeze_excite": "se_convnet"}


def run_dynparams_bench(recipe: Any, *, data_dir: str | None = None, out_dir: str | Path | None = None,
                        log: Any = print) -> dict[str, Any]:
    """Train and time the recipe's methods; returns ``{rows, meta}``. With ``out_dir`` the trainings checkpoint
    there and are reused by a re-run with the same settings."""
    from dynaneural.bench.cache import training_dir
    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.compute.flops import static_flops
    from dynaneural.data import augmentation, load_dataset
    from dynaneural.engine import TrainConfig, evaluate, train
    from dynaneural.layers import fold_batch_norms
    from dynaneural.registry import create_model
    from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, build_static_convnet
    from dynaneural.sample_wise.dynamic_params.gated_dense import calibrate_connections

    opts = recipe.options
    suffix = opts.get("suffix", "mnist")
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    bench = recipe.bench
    x_time = data.test_x[: bench.timed_samples]
    settings = {**recipe.train, "progress": False}
    cfg = TrainConfig.from_dict(settings)
    augment = augmentation(opts.get("augment"))
    meta: dict[str, Any] = {"dataset": recipe.dataset, "train_samples": int(data.train_x.shape[0]),
                            "augment": opts.get("augment"), "seed": cfg.seed}
    unknown = set(opts.get("methods", [])) - set(_METHODS)
    if unknown:
        raise ValueError(f"recipe {recipe.name}: unknown methods {sorted(unknown)}; known: {sorted(_METHODS)}")
    # The dynamic models get the static backbone's widths and classes (a recipe narrows or widens both together).
    from_backbone = {k: opts.get("backbone", {})[k] for k in ("widths", "num_classes") if k in opts.get("backbone", {})}
    if "widths" in from_backbone:
        from_backbone["widths"] = tuple(from_backbone["widths"])
    rows: list[SpeedupRow] = []

    def fit(model: torch.nn.Module, name: str, *, model_settings: Any) -> float:
        ckpt = training_dir(out_dir, name, model_settings, recipe.data, recipe.dataset, settings, opts.get("augment"))
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        train(model, train_x=data.train_x, train_y=data.train_y, val_x=data.val_x, val_y=data.val_y,
              config=TrainConfig.from_dict({**settings, "checkpoint_dir": ckpt}), augment=augment)
        model.eval()
        secs = time.perf_counter() - t0
        meta[f"{name}_train_seconds"] = secs
        return secs

    def fit_static(widths: Any, name: str) -> tuple[torch.nn.Module, float, float]:
        arch = ConvNetConfig(**{**opts.get("backbone", {}), **({"widths": tuple(widths)} if widths else {})})
        torch.manual_seed(cfg.seed)
        net = build_static_convnet(arch)
        fit(net, name, model_settings={"static": asdict(arch)})
        acc = evaluate(net, data.test_x, data.test_y).accuracy
        flops = static_flops(net, data.test_x[:1])
        log(f"{name} CNN {arch.widths}: accuracy {acc:.4f}, {flops / 1e6:.2f} MFLOPs")
        return net, acc, flops

    static, static_acc, s_flops = fit_static(None, "static")
    static_fn = fold_batch_norms(static).eval()
    meta["static_accuracy"], meta["static_flops"] = static_acc, s_flops
    equal: dict[str, Any] = {}
    if opts.get("equal_flops_widths"):
        _, eq_acc, eq_flops = fit_static(opts["equal_flops_widths"], "static_equal_flops")
        equal = {"equal_flops_widths": list(opts["equal_flops_widths"]), "equal_flops_static_accuracy": eq_acc,
                 "equal_flops_static_flops": eq_flops}
        meta.update(equal)

    def timed(method: str, model: Any, *, acc: float, mean_flops: float, ref_fn: Any, ref_flops: float,
              ref_acc: float, budget: float, extra: dict[str, Any]) -> None:
        for bs in bench.batch_sizes:
            xs = x_time if bs > 1 else x_time[: bench.timed_samples_batch1]
            t = time_against_static(ref_fn, lambda xb: model(xb, mode="execute"), xs, batch_size=bs,
                                    repeats=bench.repeats)
            theo = ref_flops / mean_flops
            rows.append(SpeedupRow(method=method, batch_size=bs, accuracy=acc, mean_flops=mean_flops,
                                   static_flops=ref_flops, theoretical_speedup=theo,
                                   realized_over_theoretical=t["realized_speedup"] / theo, budget=budget,
                                   achieved_budget=mean_flops / ref_flops, static_accuracy=ref_acc, extra=extra, **t))
            log(f"  {method} batch={bs}: acc={acc:.4f} (static {ref_acc:.4f}) flops x{mean_flops / ref_flops:.3f} "
                f"realized {t['realized_speedup']:.2f}x")

    for method in opts.get("methods", list(_METHODS)):
        kwargs = opts.get("model_kwargs", {}).get(method, {})
        model = create_model(f"{_METHODS[method]}_{suffix}", seed=cfg.seed, **{**from_backbone, **kwargs})
        secs = fit(model, method, model_settings={"config": model.config, "kwargs": kwargs})
        ev = evaluate(model, data.test_x, data.test_y, mode="execute")
        with torch.inference_mode():
            xb = data.test_x[:256]
            diff = float((model(xb, mode="simulate").logits - model(xb, mode="execute").logits).abs().max())
        log(f"{method}: accuracy {ev.accuracy:.4f} ({secs:.0f} s)")
        timed(method, model, acc=ev.accuracy, mean_flops=float(ev.mean_cost), ref_fn=static_fn, ref_flops=s_flops,
              ref_acc=static_acc, budget=float("nan"),
              extra={"accuracy_gain_pp": (ev.accuracy - static_acc) * 100, **equal,
                     **({"accuracy_gain_vs_equal_flops_pp": (ev.accuracy - equal["equal_flops_static_accuracy"])
                         * 100, "flops_vs_equal_flops_static": float(ev.mean_cost)
                         / equal["equal_flops_static_flops"]} if equal else {}),
                     "model_kwargs": kwargs,
                     "flops_increase_pct": (float(ev.mean_cost) / s_flops - 1) * 100,
                     "params": sum(p.numel() for p in model.parameters()),
                     "static_params": sum(p.numel() for p in static.parameters()),
                     "simulate_execute_max_abs_diff": diff, "train_seconds": secs})

    if opts.get("gated_dense", True):
        dense_kwargs = {"budget": opts.get("dense_train_budget", 0.5), "strategy": opts.get("dense_strategy", "pattern")}
        dense = create_model(f"gated_dense_{suffix}", seed=cfg.seed, **dense_kwargs)
        secs = fit(dense, "gated_dense", model_settings={"config": dense.config, "kwargs": dense_kwargs})
        twin = dense.to_static().eval()
        d_flops = static_flops(twin, data.test_x[:1])
        with dense.all_on():
            dense_acc = evaluate(dense, data.test_x, data.test_y, mode="execute").accuracy
        twin_fn = fold_batch_norms(twin).eval()
        log(f"gated dense: all connections {dense_acc:.4f} ({secs:.0f} s)")
        for budget in opts.get("dense_budgets", [0.6]):
            try:
                cal = calibrate_connections(dense, data.val_x, budget=budget)
            except ValueError as e:
                log(f"  gated dense budget {budget}: {e}")
                continue
            ev = evaluate(dense, data.test_x, data.test_y, mode="execute")
            with torch.inference_mode():
                open_frac = float(dense(data.test_x[:1024], mode="execute").decisions["connections"].float().mean())
            timed("gated_dense", dense, acc=ev.accuracy, mean_flops=float(ev.mean_cost), ref_fn=twin_fn,
                  ref_flops=d_flops, ref_acc=dense_acc, budget=budget,
                  extra={"threshold": cal.knob, "open_connections": open_frac, "strategy": dense.strategy,
                         "static_reference": "the same dense block with every connection (all_on)",
                         "train_seconds": secs})
    return {"rows": rows, "meta": meta}


def seed_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Across training seeds, per method: the accuracies, the gains (pp) over the static CNN of the same widths
    and over the one of equal FLOPs, their mean and sample standard deviation, and on how many seeds the gain over
    the equal-FLOPs CNN is positive. ``per_seed`` maps a seed to one run's ``{rows, meta}``."""
    import statistics

    from dynaneural.bench.stats import gain_statistics

    out: dict[str, Any] = {}
    for seed, res in sorted(per_seed.items()):
        for r in res["rows"]:
            if r.extra.get("accuracy_gain_pp") is None or r.batch_size != res["rows"][0].batch_size:
                continue  # one row per method and seed (the first batch size); gated dense has its own reference
            m = out.setdefault(r.method, {"seeds": [], "accuracy": [], "static_accuracy": [],
                                          "equal_flops_static_accuracy": [], "gain_pp": [], "gain_vs_equal_flops_pp": []})
            m["seeds"].append(seed)
            m["accuracy"].append(r.accuracy)
            m["static_accuracy"].append(res["meta"]["static_accuracy"])
            m["gain_pp"].append(r.extra["accuracy_gain_pp"])
            if "accuracy_gain_vs_equal_flops_pp" in r.extra:
                m["equal_flops_static_accuracy"].append(res["meta"]["equal_flops_static_accuracy"])
                m["gain_vs_equal_flops_pp"].append(r.extra["accuracy_gain_vs_equal_flops_pp"])
    for m in out.values():
        for key in ("accuracy", "static_accuracy", "equal_flops_static_accuracy"):
            vals = m[key]
            m[f"{key}_mean"] = statistics.fmean(vals) if vals else None
            m[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        m.update(gain_statistics(m["gain_pp"], prefix="gain"))
        m.update(gain_statistics(m["gain_vs_equal_flops_pp"], prefix="gain_vs_equal_flops"))
        m["seeds_ahead_of_equal_flops"] = m["gain_vs_equal_flops_seeds_ahead"]
    return out


def _report(summary: dict[str, Any]) -> list[str]:
    from dynaneural.bench.stats import format_p

    return [f"{method}: gain over the equal-FLOPs static CNN {m['gain_vs_equal_flops_pp_mean']:+.2f} ± "
            f"{m['gain_vs_equal_flops_pp_std'] or 0:.2f} pp over seeds {m['seeds']} "
            f"(ahead on {m['seeds_ahead_of_equal_flops']} of {len(m['seeds'])}; one-sided p: t-test "
            f"{format_p(m['gain_vs_equal_flops_t_test_p'])}, sign test {format_p(m['gain_vs_equal_flops_sign_test_p'])})"
            for method, m in summary.items()]


def cmd_bench_dynparams(args: argparse.Namespace) -> int:
    from dynaneural.cli.main import run_recipe_bench_over_seeds

    return run_recipe_bench_over_seeds(args, prefix="dynparams", run=run_dynparams_bench, summarise=seed_summary,
                                       report=_report)


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    from dynaneural.cli.main import add_dataset_option, add_seed_options

    d = bsub.add_parser("dynparams", help="dynamic parameters (CondConv, DyConv, hypernetwork, SE) and gated "
                                          "dense connections against the static CNN")
    add_dataset_option(d, default="fashion-mnist", choices=["mnist", "fashion-mnist", "cifar10"])
    d.add_argument("--recipe", default=None, help="default: dynparams_<dataset>")
    d.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    d.add_argument("--epochs", type=int, default=None)
    add_seed_options(d, seeds_help="run every seed in turn (each as --seed) and write one JSON with a summary "
                                    "across seeds")
    d.add_argument("--methods", default=None, help="comma-separated subset of the recipe's methods "
                                                   f"({','.join(_METHODS)})")
    d.add_argument("--threads", type=int, default=1, help="torch threads (timing is per thread count)")
    d.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/dynparams_fashion_mnist.json)")
    d.add_argument("--out", default=None, help="folder for resumable, reusable training checkpoints "
                                               "(e.g. runs/bench-dynparams); default: none kept")
    data_opts(d)
    common(d)
    d.set_defaults(fn=cmd_bench_dynparams)
