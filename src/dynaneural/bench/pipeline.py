"""The early-exit experiment end to end: train → calibrate to each budget → measure → compare → report.

Used by ``dynaneural demo`` (digits recipe) and ``dynaneural bench early-exit`` (any recipe). Everything it
produces is returned as one JSON-able dict and written to ``<out>/metrics.json``; plots go next to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynaneural.bench.early_exit import (
    benchmark_early_exit,
    benchmark_static,
    overhead_with_exits_disabled,
    run_in_batches,
)
from dynaneural.bench.plots import plot_accuracy_vs_compute, plot_exit_histogram
from dynaneural.calibration import calibrate_exits
from dynaneural.data import DatasetSplits, augment_cifar, load_dataset
from dynaneural.engine import TrainConfig, save_model, train
from dynaneural.layers import fold_batch_norms
from dynaneural.recipes import Recipe
from dynaneural.registry import create_model
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork
from dynaneural.version import __version__

__all__ = ["run_early_exit_experiment", "train_recipe_model", "format_table", "dominance"]

Log = Callable[[str], None]


def train_recipe_model(recipe: Recipe, data: DatasetSplits, *, out_dir: Path, tag: str,
                       model_overrides: dict[str, Any] | None = None, progress: bool = True) -> MultiExitNetwork:
    """Build the recipe's model (with overrides) and train it with the recipe's settings; resumes if interrupted."""
    kwargs = {**recipe.model_kwargs, **(model_overrides or {})}
    model = create_model(recipe.model, seed=int(recipe.train.get("seed", 0)), **kwargs)
    cfg = TrainConfig.from_dict({**recipe.train, "checkpoint_dir": out_dir / "checkpoints" / tag,
                                 "progress": progress})
    augment = augment_cifar if recipe.dataset == "cifar10" else None
    train(model, train_x=data.train_x, train_y=data.train_y, val_x=data.val_x, val_y=data.val_y, config=cfg,
          augment=augment)
    return model.eval()  # type: ignore[return-value]


def dominance(dynamic: list[dict[str, Any]], static: list[dict[str, Any]], *, speedup_key: str = "realized_speedup"
              ) -> dict[str, Any]:
    """Does the dynamic curve beat the static family at equal measured time?

    For each dynamic point (time relative to the full network = 1 / ``row[speedup_key]``) the static family's
    accuracy at that same relative time is linearly interpolated (static points sorted by time; outside their
    range the nearest cheaper network is used). Dominates if every dynamic point is more accurate.
    """
    pts = sorted((s["relative_time"], s["accuracy"]) for s in static)
    margins = []
    for row in dynamic:
        t = 1.0 / row[speedup_key]
        cheaper = [p for p in pts if p[0] <= t]
        dearer = [p for p in pts if p[0] > t]
        if cheaper and dearer:
            (t0, a0), (t1, a1) = cheaper[-1], dearer[0]
            ref = a0 + (a1 - a0) * (t - t0) / (t1 - t0)
        elif cheaper:
            ref = max(a for _, a in cheaper)
        else:
            ref = float("nan")  # faster than every static network: nothing to compare with at that time
        margins.append({"budget": row["budget"], "relative_time": t, "accuracy": row["accuracy"],
                        "static_accuracy_at_same_time": ref, "margin_pp": 100 * (row["accuracy"] - ref)})
    valid = [m for m in margins if m["static_accuracy_at_same_time"] == m["static_accuracy_at_same_time"]]
    return {"dominates": bool(valid) and all(m["margin_pp"] > 0 for m in valid), "points": margins}


def run_early_exit_experiment(recipe: Recipe, *, out_dir: str | Path, data_dir: str | Path | None = None,
                              progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Run the whole experiment of a recipe and write ``metrics.json``, plots and the calibrated checkpoint."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    log(f"[data] {recipe.dataset}: {data.sizes}")
    model = train_recipe_model(recipe, data, out_dir=out, tag="dynamic", progress=progress)
    profile = model.cost_profile()
    log(f"[model] {recipe.model}: {profile.static_total / 1e6:.3f} MFLOPs at full depth, {model.num_exits} exits")
    with torch.inference_mode():
        model.disable_exits()
        full_logits = torch.cat(run_in_batches(model.to_static(), data.test_x, 512))
        full_acc = float((full_logits.argmax(-1) == data.test_y).float().mean())
    cal, bench = recipe.calibration, recipe.bench
    # Inference as it would be deployed: batch norms folded into the convolutions, on both sides of every
    # comparison (the static twins below come from the folded copy too).
    infer = fold_batch_norms(model)
    rows = benchmark_early_exit(infer, val_x=data.val_x, val_y=data.val_y, test_x=data.test_x, test_y=data.test_y,
                                budgets=cal.budgets, batch_sizes=bench.batch_sizes, unit=cal.unit,
                                method=cal.method, rule=cal.rule, repeats=bench.repeats,
                                timed_samples=bench.timed_samples, timed_samples_batch1=bench.timed_samples_batch1)
    row_dicts = [r.to_dict() for r in rows]
    for r in row_dicts:
        r["accuracy_loss_pp"] = 100 * (full_acc - r["accuracy"])
    overhead = [overhead_with_exits_disabled(infer, data.test_x, batch_size=b, repeats=bench.repeats,
                                             timed_samples=bench.timed_samples if b > 1 else bench.timed_samples_batch1)
                for b in bench.batch_sizes]
    static_rows: list[dict[str, Any]] = []
    dom: dict[str, Any] = {}
    if bench.static_family:
        members: dict[str, torch.nn.Module] = {}
        flops: dict[str, float] = {}
        for i, overrides in enumerate(bench.static_family):
            name = "static-" + "-".join(f"{k}{v}" for k, v in overrides.items()) if overrides else f"static-{i}"
            m = train_recipe_model(recipe, data, out_dir=out, tag=name, progress=progress,
                                   model_overrides={**overrides, "exits": "last"})
            m = fold_batch_norms(m)
            members[name] = m.to_static()
            flops[name] = m.cost_profile().static_total
        members["full-depth (the dynamic network's static twin)"] = infer.to_static()
        flops["full-depth (the dynamic network's static twin)"] = infer.cost_profile().static_total
        for b in bench.batch_sizes:
            srows = benchmark_static(members, infer.to_static(), test_x=data.test_x, test_y=data.test_y, flops=flops,
                                     batch_size=b, repeats=bench.repeats,
                                     timed_samples=bench.timed_samples if b > 1 else bench.timed_samples_batch1)
            static_rows += [s.to_dict() for s in srows]
            dom[str(b)] = dominance([r for r in row_dicts if r["batch_size"] == b],
                                    [s.to_dict() for s in srows])
            if b > 1:  # the stream's time against the static networks run in batches of b
                dom[f"{b}-stream"] = dominance([r for r in row_dicts if r["batch_size"] == b],
                                               [s.to_dict() for s in srows], speedup_key="realized_speedup_stream")
    # Keep the model calibrated to the middle budget, and save it with every calibration's thresholds.
    mid = cal.budgets[len(cal.budgets) // 2]
    chosen = calibrate_exits(model, data.val_x, data.val_y, budget=mid, unit=cal.unit, method=cal.method,  # type: ignore[arg-type]
                             rule=cal.rule) if cal.unit != "ms" else None
    ckpt = save_model(model, out / "model.safetensors",
                      extras={"recipe": recipe.name, "calibration": chosen.to_dict() if chosen else None,
                              "thresholds_by_budget": {str(r["budget"]): r["thresholds"] for r in row_dicts}})
    metrics = {
        "library_version": __version__, "recipe": recipe.name, "model": recipe.model, "dataset": recipe.dataset,
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "full_depth_flops": infer.cost_profile().static_total, "full_depth_accuracy": full_acc,
        "batch_norm_folded": True,
        "stage_flops": list(infer.cost_profile().stage), "exit_head_flops": list(infer.cost_profile().head),
        "rows": row_dicts, "overhead_exits_disabled": overhead, "static_family": static_rows, "dominance": dom,
        "checkpoint": str(ckpt), "seconds": time.perf_counter() - t_start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    main_bs = max(bench.batch_sizes)
    plot_accuracy_vs_compute([r for r in row_dicts if r["batch_size"] == main_bs], out / "accuracy_vs_compute.png",
                             static=[s for s in static_rows if s["batch_size"] == main_bs],
                             title=f"{recipe.model} on {recipe.dataset}")
    plot_exit_histogram([r for r in row_dicts if r["batch_size"] == main_bs], out / "exit_histogram.png",
                        title=f"where samples leave — {recipe.model}")
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """The human-readable summary of an experiment's metrics."""
    bss = sorted({r["batch_size"] for r in metrics["rows"]})
    head = (["budget", "accuracy", "Δacc pp", "MFLOPs", "theory x"] + [f"lat-model b{b}" for b in bss]
            + [f"real x b{b}" for b in bss] + [f"stream b{b}" for b in bss if b > 1] + ["exits %"])
    lines = [" | ".join(f"{h:>10}" for h in head)]
    for budget in sorted({r["budget"] for r in metrics["rows"]}):
        rs = {r["batch_size"]: r for r in metrics["rows"] if r["budget"] == budget}
        r0 = rs[bss[0]]
        cells = [f"{budget:g}", f"{100 * r0['accuracy']:.2f}", f"{r0['accuracy_loss_pp']:+.2f}",
                 f"{r0['mean_flops'] / 1e6:.3f}", f"{r0['theoretical_speedup']:.2f}"]
        cells += [f"{rs[b]['latency_model_speedup']:.2f}" for b in bss]
        cells += [f"{rs[b]['realized_speedup']:.2f}" for b in bss]
        cells += [f"{rs[b]['realized_speedup_stream']:.2f}" for b in bss if b > 1]
        cells += ["/".join(f"{100 * f:.0f}" for f in r0["exit_fractions"])]
        lines.append(" | ".join(f"{c:>10}" for c in cells))
    lines.append(f"full depth: {100 * metrics['full_depth_accuracy']:.2f} % at "
                 f"{metrics['full_depth_flops'] / 1e6:.3f} MFLOPs")
    for budget in sorted({r["budget"] for r in metrics["rows"]}):
        r0 = next(r for r in metrics["rows"] if r["budget"] == budget)
        if r0.get("controlled_budget_error") is not None:
            lines.append(f"budget {budget:g} on the test set: fixed thresholds {100 * r0['budget_error']:+.1f} %, "
                         f"held online {100 * r0['controlled_budget_error']:+.1f} % "
                         f"(accuracy {100 * r0['controlled_accuracy']:.2f} %)")
    for o in metrics["overhead_exits_disabled"]:
        lines.append(f"execute mode, every exit disabled, batch {o['batch_size']}: "
                     f"{o['overhead_ratio']:.3f}× the static twin's time")
    for b, d in metrics.get("dominance", {}).items():
        what = f"a stream in slots of {b[:-7]}" if b.endswith("-stream") else f"batch {b}"
        lines.append(f"{what}: dynamic curve dominates the static family at equal measured time: {d['dominates']}")
    return "\n".join(lines)
