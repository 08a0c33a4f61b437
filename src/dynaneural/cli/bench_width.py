"""``dynaneural bench width``: per-sample width (slimmable levels, FBS channel gating) against the full width.

Trains the recipe's slimmable CNN (all widths, in-place distillation, width policy) and its FBS channel-gated CNN
of the same architecture, calibrates the width policy's threshold to each budget on the validation split, and
writes one :class:`~dynaneural.bench.rows.SpeedupRow` per (method, budget, batch size): test accuracy in execute
mode, mean FLOPs from the ledger, theoretical speed-up (full-width FLOPs / mean FLOPs) and realized speed-up
(full-width static CNN, BN folded, against the dynamic model in execute mode, timed interleaved in one run).
The full-width reference is the slimmable network at 100 % width (``all_on``: its static twin).

``options.choosers`` lists the per-sample width choosers to calibrate and time on the one trained network: the
input policy (``{chooser: policy}``, method ``slimmable``) and the confidence cascade (``{chooser: cascade,
cascade_levels: [1, 3]}``, method ``slimmable_cascade_50_100``). They change no training, so they stay out of the
checkpoint digest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run_width_bench"]

_EVAL_ONLY_OPTIONS = ("choosers",)


def _train(model: torch.nn.Module, recipe: Any, data: Any, *, extra: dict[str, Any] | None = None,
           out_dir: str | Path | None = None, tag: str = "") -> float:
    """Train with the recipe's settings; with ``out_dir``, resumable and reused (``bench.cache.training_dir``).
    Returns the training's own seconds (summed over its epochs, across resumes; a reused training's too)."""
    from dynaneural.bench.cache import training_dir
    from dynaneural.data import augmentation
    from dynaneural.engine import TrainConfig, train

    settings = {**recipe.train, "progress": False, **(extra or {})}
    # Options that only change the evaluation (which choosers are timed) stay out of the digest: adding one
    # re-times the cached trainings instead of retraining them.
    train_opts = {k: v for k, v in recipe.options.items() if k not in _EVAL_ONLY_OPTIONS}
    ckpt = training_dir(out_dir, tag, getattr(model, "config", None), train_opts, recipe.data, recipe.dataset,
                        settings)
    cfg = TrainConfig.from_dict({**settings, "checkpoint_dir": ckpt})
    res = train(model, train_x=data.train_x, train_y=data.train_y, val_x=data.val_x, val_y=data.val_y, config=cfg,
                augment=augmentation(recipe.options.get("augment")))
    model.eval()
    return float(sum(h.get("seconds", 0.0) for h in res.history))


def run_width_bench(recipe: Any, *, data_dir: str | None = None, out_dir: str | Path | None = None,
                    log: Any = print) -> dict[str, Any]:
    """Train, calibrate and time the recipe's width methods; returns ``{rows, meta}``. With ``out_dir`` the
    trainings checkpoint there and are reused by a re-run with the same settings."""
    from dynaneural.bench.early_exit import run_in_batches
    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.bench.timing import compare
    from dynaneural.compute.flops import static_flops
    from dynaneural.data import load_dataset
    from dynaneural.engine import evaluate
    from dynaneural.layers import fold_batch_norms
    from dynaneural.registry import create_model
    from dynaneural.sample_wise.dynamic_width.slimmable import calibrate_width

    opts = recipe.options
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    torch.manual_seed(recipe.train.get("seed", 0))
    bench = recipe.bench
    x_time = data.test_x[: bench.timed_samples]
    rows: list[SpeedupRow] = []
    meta: dict[str, Any] = {"dataset": recipe.dataset, "train_samples": int(data.train_x.shape[0])}

    def timed_rows(method: str, model: Any, static: Any, *, acc: float, mean_flops: float, full_flops: float,
                   static_acc: float, budget: float, extra: dict[str, Any], stream: Any = None) -> None:
        """Time ``model`` against ``static`` per batch size; with ``stream`` (a multi-exit network taking
        ``slots=``), also a stream of the same inputs in slots of the batch size (keys ``*_stream``)."""
        static_fn = fold_batch_norms(static).eval()
        for bs in bench.batch_sizes:
            xs = x_time if bs > 1 else x_time[: bench.timed_samples_batch1]
            t = time_against_static(static_fn, lambda xb: model(xb, mode="execute"), xs, batch_size=bs,
                                    repeats=bench.repeats)
            theo = full_flops / mean_flops
            more = dict(extra)
            if stream is not None and bs > 1:
                with torch.inference_mode():  # as time_against_static: no autograd on either side
                    s = compare(lambda xs=xs, bs=bs: run_in_batches(static_fn, xs, bs),
                                lambda xs=xs, bs=bs: stream(xs, mode="execute", validate=False, slots=bs),
                                repeats=bench.repeats)
                more |= {"realized_speedup_stream": s.speedup, "realized_over_theoretical_stream": s.speedup / theo,
                         "stream_ms_per_sample": s.candidate_s * 1e3 / xs.shape[0]}
            rows.append(SpeedupRow(method=method, batch_size=bs, accuracy=acc, mean_flops=mean_flops,
                                   static_flops=full_flops, theoretical_speedup=theo,
                                   realized_over_theoretical=t["realized_speedup"] / theo, budget=budget,
                                   achieved_budget=mean_flops / full_flops, static_accuracy=static_acc,
                                   extra=more, **t))
            streamed = (f" streamed={more['realized_speedup_stream']:.2f}x" if "realized_speedup_stream" in more
                        else "")
            log(f"  {method} budget={budget:.2f} batch={bs}: acc={acc:.4f} flops={mean_flops / full_flops:.3f} "
                f"theoretical={theo:.2f}x realized={t['realized_speedup']:.2f}x{streamed}")

    # ---------------------------------------------------------------- slimmable widths
    t0 = time.perf_counter()
    slim = create_model(opts.get("slimmable_model", "slimmable_mnist"), seed=int(recipe.train.get("seed", 0)),
                        **opts.get("slimmable_kwargs", {}))
    meta["slimmable_train_seconds"] = _train(slim, recipe, data, out_dir=out_dir, tag="slimmable")
    meta["slimmable_wall_seconds"] = time.perf_counter() - t0  # this call: ~0 when the training was reused
    static = slim.to_static()
    full_flops = static_flops(static, data.test_x[:1])
    with slim.all_on():
        full_acc = evaluate(slim, data.test_x, data.test_y, mode="execute").accuracy
    per_width = evaluate(slim, data.test_x, data.test_y, mode="train").exit_accuracy
    meta["full_width_accuracy"], meta["per_width_accuracy"] = full_acc, per_width
    log(f"slimmable: full width {full_acc:.4f}, per width {per_width} ({meta['slimmable_train_seconds']:.0f} s)")
    for spec in opts.get("choosers", [{"chooser": "policy"}]):
        unknown = set(spec) - {"chooser", "cascade_levels"}
        if unknown:
            raise ValueError(f"options.choosers entries take 'chooser' and 'cascade_levels', got {sorted(unknown)}")
        chooser = spec.get("chooser", "policy")
        slim.set_chooser(chooser, cascade_levels=spec.get("cascade_levels"))
        method = "slimmable" if chooser == "policy" else "slimmable_cascade_" + "_".join(
            str(round(100 * slim.width_mults[lv])) for lv in slim.ladder)  # e.g. slimmable_cascade_50_100
        for budget in recipe.calibration.budgets:
            cal = calibrate_width(slim, data.val_x, budget=budget)
            ev = evaluate(slim, data.test_x, data.test_y, mode="execute")
            val_acc = evaluate(slim, data.val_x, data.val_y, mode="execute").accuracy  # to choose among choosers
            with torch.inference_mode():
                widths = torch.cat([slim(data.test_x[i:i + 1024], mode="execute").width
                                    for i in range(0, data.test_x.shape[0], 1024)])
            hist = torch.bincount(widths, minlength=slim.num_levels).double() / widths.numel()
            extra = {"chooser": chooser, "threshold": cal.knob, "validation_cost": cal.mean_cost,
                     "validation_accuracy": val_acc,
                     "width_fraction": [round(float(h), 4) for h in hist], "width_mults": list(slim.width_mults)}
            stream = None
            if chooser == "cascade":
                extra["cascade_levels"] = list(slim.ladder)
                # the same cascade as a plain model cascade (BN folded, as the static side): streamed execution
                stream = fold_batch_norms(slim.to_cascade()).eval()
            timed_rows(method, slim, static, acc=ev.accuracy, mean_flops=float(ev.mean_cost), full_flops=full_flops,
                       static_acc=full_acc, budget=budget, extra=extra, stream=stream)
    slim.set_chooser(slim.config["chooser"], cascade_levels=slim.config["cascade_levels"])

    # ---------------------------------------------------------------- FBS channel gating
    for keep in opts.get("gating_keep", [0.5]):
        gate = create_model(opts.get("gating_model", "channel_gating_mnist"), seed=int(recipe.train.get("seed", 0)),
                            keep=keep)
        secs = _train(gate, recipe, data, extra={"distill_alpha": 0.0}, out_dir=out_dir, tag=f"gating-keep{keep}")
        ev = evaluate(gate, data.test_x, data.test_y, mode="execute")
        log(f"channel gating keep={keep}: {ev.accuracy:.4f} ({secs:.0f} s)")
        timed_rows("channel_gating", gate, gate.to_static(), acc=ev.accuracy, mean_flops=float(ev.mean_cost),
                   full_flops=static_flops(gate.to_static(), data.test_x[:1]), static_acc=full_acc, budget=keep,
                   extra={"keep": keep, "train_seconds": secs,
                          "static_reference": "slimmable full width (same architecture, separate training)"})
    return {"rows": rows, "meta": meta}


def cmd_bench_width(args: argparse.Namespace) -> int:
    from dynaneural.cli.main import run_recipe_bench

    return run_recipe_bench(args, prefix="width", run=run_width_bench)


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    from dynaneural.cli.main import add_dataset_option

    w = bsub.add_parser("width", help="dynamic width: slimmable per-sample widths and FBS channel gating")
    add_dataset_option(w, default="mnist", choices=["mnist", "fashion-mnist", "cifar10"])
    w.add_argument("--recipe", default=None, help="default: width_<dataset>")
    w.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    w.add_argument("--epochs", type=int, default=None)
    w.add_argument("--threads", type=int, default=1, help="torch threads (timing is per thread count)")
    w.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/width_mnist.json)")
    w.add_argument("--out", default=None, help="folder for resumable, reusable training checkpoints "
                                               "(e.g. runs/bench-width); default: none kept")
    data_opts(w)
    common(w)
    w.set_defaults(fn=cmd_bench_width)
