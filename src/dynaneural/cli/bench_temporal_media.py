"""``dynaneural bench temporal-media --task {video,audio,fusion}``: train, calibrate and time the temporal media models.

* ``video`` — moving-digits clips (``temporal_wise/video/moving_digits.py``): early exit over frames
  (``frame_exit_moving_digits``) and AdaFrame (``adaframe_moving_digits``, warm-started from the frame-exit model's
  encoder, memory and classifier), each calibrated to frame budgets on validation clips;
* ``audio`` — FSDD log-mel spectrograms: early exit over time (``audio_exit_fsdd``);
* ``fusion`` — FSDD + MNIST pairs with one modality sometimes destroyed: gated audio-visual fusion
  (``fusion_fsdd_mnist``), its gate calibrated to cost budgets.

Every row holds the shared ``SpeedupRow`` keys (accuracy on the test split in execute mode, mean FLOPs, theoretical
speed-up = static FLOPs / mean FLOPs, realized speed-up = static-twin time / dynamic time measured interleaved in one
run) plus method-specific keys (``frames_seen_fraction``, ``mean_exit_step``, modality fractions...). The static
twin is the same trained weights reading everything with the fastest static kernels (batched encoder over every
frame, fused ``nn.LSTM``). Pictures of what was read go to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["register"]


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    p = bsub.add_parser("temporal-media", help="video frame selection / exit, audio exit, gated audio-visual fusion")
    p.add_argument("--task", required=True, choices=["video", "audio", "fusion"])
    p.add_argument("--recipe", default=None, help="default: temporal_media_<task>")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant (a smoke-sized run)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--json", default=None, help="write the rows here (default benchmarks/temporal_media_<task>.json)")
    p.add_argument("--out", default=None, help="run folder for pictures and the trainings' checkpoints, which a "
                   "re-run with the same settings reuses (default runs/bench-<recipe>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the timing (training uses the recipe's "
                   "num_threads)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train and measure once per training seed (model init, data order, sampling); the data "
                        "split stays fixed. Rows carry their seed; a per-budget mean and spread is printed")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_temporal_media)


def cmd_bench_temporal_media(args: argparse.Namespace) -> int:
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator, _recipe

    _maybe_reexec_with_tuned_allocator(args)
    args.recipe = args.recipe or f"temporal_media_{args.task}"
    recipe = _recipe(args)
    out = Path(args.out or f"runs/bench-{recipe.name}")
    import torch

    torch.set_num_threads(args.threads)  # the trainer sets the recipe's count while training and restores this one
    t0 = time.perf_counter()
    runner = {"video": _run_video, "audio": _run_audio, "fusion": _run_fusion}[args.task]
    from dynaneural.bench.rows import format_rows, write_bench_json

    columns = ["method", "budget", "batch_size", "accuracy", "static_accuracy", "theoretical_speedup",
               "realized_speedup", "realized_over_theoretical", "realized_speedup_stream", "frames_seen_fraction"]
    if not args.seeds:
        rows, meta = runner(recipe, data_dir=args.data_dir, out=out, progress=not args.no_progress)
    else:
        rows, metas = [], {}
        for seed in args.seeds:
            seeded = copy.deepcopy(recipe)
            seeded.train["seed"] = int(seed)
            seed_rows, metas[str(seed)] = runner(seeded, data_dir=args.data_dir, out=out / f"seed{seed}",
                                                 progress=not args.no_progress)
            for row in seed_rows:
                row.extra["seed"] = int(seed)
            rows += seed_rows
        meta = {"seeds": list(args.seeds), "per_seed": metas, "seed_summary": seed_summary(rows)}
        columns.append("seed")
        print(format_seed_summary(meta["seed_summary"]))
    print(format_rows(rows, columns))
    path = write_bench_json(args.json or f"benchmarks/temporal_media_{args.task}.json", rows, task=args.task,
                            recipe=recipe.name, seconds=time.perf_counter() - t0, **meta)
    print(f"wrote {path} and pictures under {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


# ------------------------------------------------------------------------------------------------- helpers
def seed_summary(rows: list[Any]) -> list[dict[str, Any]]:
    """Per (method, budget, batch size): mean and sample standard deviation over the seeds of the accuracy, its
    difference to the all-frames static accuracy of the same seed, and the realized speed-up."""
    groups: dict[tuple[str, float, int], list[Any]] = {}
    for r in rows:
        groups.setdefault((r.method, r.budget, r.batch_size), []).append(r)

    def stats(v: list[float]) -> tuple[float, float]:
        m = sum(v) / len(v)
        sd = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else math.nan
        return m, sd

    out = []
    for (method, budget, bs), rs in groups.items():
        delta = [100.0 * (r.accuracy - r.static_accuracy) for r in rs]
        d_mean, d_sd = stats(delta)
        a_mean, a_sd = stats([100.0 * r.accuracy for r in rs])
        s_mean, s_sd = stats([r.realized_speedup for r in rs])
        t_mean, _ = stats([r.theoretical_speedup for r in rs])
        streamed = [r.extra["realized_speedup_stream"] for r in rs if "realized_speedup_stream" in r.extra]
        stream_stats = dict(zip(("realized_speedup_stream_mean", "realized_speedup_stream_std"), stats(streamed),
                                strict=True)) if streamed else {}
        out.append({**stream_stats, "method": method, "budget": budget, "batch_size": bs,
                    "seeds": [r.extra.get("seed") for r in rs], "accuracy_mean": a_mean, "accuracy_std": a_sd, "delta_pp": delta, "delta_pp_mean": d_mean,
                    "delta_pp_std": d_sd, "delta_pp_worst": min(delta), "realized_speedup_mean": s_mean,
                    "realized_speedup_std": s_sd, "theoretical_speedup_mean": t_mean})
    return out


def format_seed_summary(summary: list[dict[str, Any]]) -> str:
    lines = ["method                 budget  batch  acc % (mean ± sd)   Δ pp (mean ± sd, worst)   theory  realized"]
    for s in summary:
        lines.append(f"{s['method']:<22} {s['budget']:>6} {s['batch_size']:>6}  {s['accuracy_mean']:6.2f} ± "
                     f"{s['accuracy_std']:4.2f}      {s['delta_pp_mean']:+5.2f} ± {s['delta_pp_std']:4.2f}, "
                     f"{s['delta_pp_worst']:+5.2f}       {s['theoretical_speedup_mean']:5.2f}×  "
                     f"{s['realized_speedup_mean']:5.2f}× ± {s['realized_speedup_std']:.2f}"
                     + (f"  stream {s['realized_speedup_stream_mean']:5.2f}×" if "realized_speedup_stream_mean" in s
                        else ""))
    return "\n".join(lines)


def _train(model: Any, recipe: Any, x: Any, y: Any, vx: Any, vy: Any, *, loss_fn: Any, progress: bool,
           cache: Path | None = None) -> float:
    """Train with the recipe's settings; returns the seconds it took. With ``cache`` (a
    ``bench.cache.training_dir``), the training checkpoints there and a finished one is loaded, not redone."""
    import torch

    from dynaneural.engine import TrainConfig, train

    cfg = TrainConfig.from_dict({**recipe.train, "progress": progress, "device": "cpu", "checkpoint_dir": cache})
    t = time.perf_counter()
    train(model, train_x=x, train_y=y, val_x=vx, val_y=vy, config=cfg, loss_fn=loss_fn)
    model.eval()
    torch.set_grad_enabled(True)
    return time.perf_counter() - t


def _accuracy(fn: Any, x: Any, y: Any, batch_size: int = 256) -> tuple[float, Any]:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            outs.append(fn(x[i:i + batch_size]))
    if hasattr(outs[0], "logits"):
        logits = torch.cat([o.logits for o in outs])
        merged = {"logits": logits, "cost": torch.cat([o.cost for o in outs]),
                  "decisions": {k: torch.cat([o.decisions[k] for o in outs]) for k in outs[0].decisions}}
    else:
        logits = torch.cat(outs)
        merged = {"logits": logits}
    return float((logits.argmax(-1) == y).float().mean()), merged


def _row(method: str, model: Any, static: Any, x: Any, y: Any, *, static_acc: float, budget: float,
         batch_sizes: list[int], bench: Any, extra_fn: Any, calib: Any = None, stream: bool = False) -> list[Any]:
    """Accuracy, cost and timing rows of a calibrated model. ``stream``: also time it on a stream with continuous
    batching (``model(x, mode="execute", slots=batch)``; keys ``realized_speedup_stream`` ...)."""
    import torch

    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.layers import fold_batch_norms

    acc, res = _accuracy(lambda xb: model(xb, mode="execute"), x, y)
    mean_flops = float(res["cost"].mean())
    static_flops = float(model.static_cost)
    extra = extra_fn(res)
    # Timing: batch norms folded into the convolutions on both sides (the static twin of the folded model
    # shares its folded modules), as in every other bench.
    timed = fold_batch_norms(model)
    timed_static = timed.to_static().eval() if hasattr(timed, "to_static") else static
    rows = []
    for bs in batch_sizes:
        n = min(x.shape[0], bench.timed_samples if bs > 1 else bench.timed_samples_batch1)
        with torch.inference_mode():
            t = time_against_static(timed_static, lambda xb: timed(xb, mode="execute"), x[:n], batch_size=bs,
                                    repeats=bench.repeats)
        theo = static_flops / mean_flops
        row_extra = dict(extra)
        if stream and bs > 1:
            row_extra.update(_time_stream(timed_static, timed, x[:n], batch_size=bs, repeats=bench.repeats))
            row_extra["realized_over_theoretical_stream"] = row_extra["realized_speedup_stream"] / theo
        rows.append(SpeedupRow(method=method, batch_size=bs, accuracy=acc, mean_flops=mean_flops,
                               static_flops=static_flops, theoretical_speedup=theo,
                               realized_speedup=t["realized_speedup"],
                               realized_over_theoretical=t["realized_speedup"] / theo,
                               static_ms_per_sample=t["static_ms_per_sample"],
                               dynamic_ms_per_sample=t["dynamic_ms_per_sample"], timed_samples=t["timed_samples"],
                               budget=budget, unit="fraction", achieved_budget=mean_flops / static_flops,
                               budget_error=mean_flops / static_flops - budget if not math.isnan(budget) else math.nan,
                               static_accuracy=static_acc, extra=row_extra))
    return rows


def _time_stream(static: Any, model: Any, x: Any, *, batch_size: int, repeats: int) -> dict[str, float]:
    """Throughput on a stream: the static twin over ``x`` in batches of ``batch_size`` against the dynamic model
    running all of ``x`` with ``batch_size`` slots (continuous batching), interleaved medians."""
    import torch

    from dynaneural.bench.timing import compare

    def static_run() -> None:
        for i in range(0, x.shape[0], batch_size):
            static(x[i:i + batch_size])

    with torch.inference_mode():
        cmp = compare(static_run, lambda: model(x, mode="execute", slots=batch_size), repeats=repeats, warmup=2)
    return {"realized_speedup_stream": cmp.speedup, "stream_ms_per_sample": cmp.candidate_s * 1e3 / x.shape[0],
            "stream_static_ms_per_sample": cmp.baseline_s * 1e3 / x.shape[0]}


def _static_acc(model: Any, x: Any, y: Any) -> tuple[float, Any]:
    static = model.to_static().eval()
    acc, _ = _accuracy(static, x, y)
    return acc, static


# --------------------------------------------------------------------------------------------------- video
def _run_video(recipe: Any, *, data_dir: Any, out: Path, progress: bool) -> tuple[list[Any], dict[str, Any]]:
    import torch

    import dynaneural as dn
    from dynaneural.bench.cache import training_dir
    from dynaneural.temporal_wise.video.moving_digits import MovingDigitsConfig, load_moving_digits
    from dynaneural.temporal_wise.video.visualize import plot_clip_selection, plot_timelines

    opt = recipe.options
    torch.manual_seed(int(recipe.train.get("seed", 0)))
    cfg = MovingDigitsConfig(**opt.get("clips", {}))
    data = load_moving_digits(data_dir=data_dir, seed=int(recipe.data.get("seed", 0)), n_train=int(opt["n_train"]),
                              n_val=int(opt["n_val"]), n_test=int(opt["n_test"]), config=cfg)
    tr, va, te = data.train, data.val, data.test
    kw: dict[str, Any] = {"frames": cfg.frames, "size": cfg.size}
    if opt.get("encoder_widths"):  # channels of the per-frame CNN (shared by both models and the static twin)
        kw["widths"] = tuple(int(w) for w in opt["encoder_widths"])
    rows: list[Any] = []
    meta: dict[str, Any] = {"clips": data.as_dict(), "encoder_widths": list(kw.get("widths", (16, 32, 64)))}

    # 1. Early exit over frames (also the warm start of AdaFrame).
    fe_name = opt.get("frame_exit_model", "frame_exit_moving_digits")
    fe = dn.create_model(fe_name, seed=int(recipe.train.get("seed", 0)), **kw)
    # What determines the frame-exit training (not AdaFrame's own settings, so that changing those reuses it).
    fe_key = (fe_name, kw, recipe.train, recipe.data, {k: v for k, v in opt.items() if k != "adaframe_train"})
    meta["frame_exit_train_s"] = _train(fe, recipe, tr.x, tr.y, va.x, va.y, loss_fn=fe.training_loss,
                                        progress=progress, cache=training_dir(out, "frame_exit", *fe_key))
    static_acc, static = _static_acc(fe, te.x, te.y)
    meta["static_accuracy_all_frames"] = static_acc
    for budget in recipe.calibration.budgets:
        try:
            fe.calibrate(va.x, budget=float(budget))
        except ValueError as e:
            print(f"frame_exit: budget {budget} not reachable: {e}")
            continue
        rows += _row("frame_exit", fe, static, te.x, te.y, static_acc=static_acc, budget=float(budget),
                     batch_sizes=recipe.bench.batch_sizes, bench=recipe.bench, extra_fn=_frames_extra(te), stream=True)
    res = _accuracy(lambda xb: fe(xb, mode="execute"), te.x[:24], te.y[:24])[1]
    plot_timelines(res["decisions"]["frames"], out / "frame_exit_timelines.png", key=te.key_frames[:24],
                   labels=te.y[:24], preds=res["logits"].argmax(-1), title="early exit over frames (in order)")

    # 2. AdaFrame, warm-started from the frame-exit model.
    ada = dn.create_model(recipe.model, seed=int(recipe.train.get("seed", 0)), **{**kw, **recipe.model_kwargs})
    for name in ("encoder", "memory", "classifier"):
        getattr(ada, name).load_state_dict(getattr(fe, name).state_dict())
    ada_train = {**recipe.train, **opt.get("adaframe_train", {})}
    meta["adaframe_train_s"] = _train(ada, SimpleNamespace(train=ada_train), tr.x, tr.y, va.x, va.y,
                                      loss_fn=ada.training_loss, progress=progress,
                                      cache=training_dir(out, "adaframe", recipe.model, recipe.model_kwargs,
                                                         ada_train, fe_key))
    ada_static_acc, ada_static = _static_acc(ada, te.x, te.y)
    for budget in recipe.calibration.budgets:
        try:
            ada.calibrate(va.x, budget=float(budget))
        except ValueError as e:
            print(f"adaframe: budget {budget} not reachable: {e}")
            continue
        rows += _row(f"adaframe_{ada.stop_rule}", ada, ada_static, te.x, te.y, static_acc=ada_static_acc,
                     budget=float(budget), batch_sizes=recipe.bench.batch_sizes, bench=recipe.bench,
                     extra_fn=_frames_extra(te), stream=True)
    res = _accuracy(lambda xb: ada(xb, mode="execute"), te.x[:24], te.y[:24])[1]
    plot_timelines(res["decisions"]["frames"], out / "adaframe_timelines.png", order=res["decisions"]["frame_order"],
                   key=te.key_frames[:24], labels=te.y[:24], preds=res["logits"].argmax(-1),
                   title="AdaFrame: frames looked at (numbers = visiting order)")
    plot_clip_selection(te.x[:6], res["decisions"]["frames"][:6], out / "adaframe_clips.png",
                        order=res["decisions"]["frame_order"][:6], labels=te.y[:6],
                        preds=res["logits"].argmax(-1)[:6])
    meta["adaframe_static_accuracy_all_frames_in_order"] = ada_static_acc
    return rows, meta


def _frames_extra(split: Any) -> Any:
    def fn(res: dict[str, Any]) -> dict[str, Any]:
        frames = res["decisions"]["frames"]
        key = split.key_frames[: frames.shape[0]]
        hit = (frames & key).any(1).float().mean()
        return {"frames_seen_fraction": float(frames.float().mean()),
                "mean_frames_seen": float(frames.float().sum(1).mean()),
                "mean_exit_step": float(res["decisions"]["exit_step"].float().mean()),
                "key_frame_seen_rate": float(hit)}

    return fn


# --------------------------------------------------------------------------------------------------- audio
def _run_audio(recipe: Any, *, data_dir: Any, out: Path, progress: bool) -> tuple[list[Any], dict[str, Any]]:
    import torch

    import dynaneural as dn
    from dynaneural.bench.cache import training_dir
    from dynaneural.temporal_wise.audio.fsdd_features import load_fsdd_logmel
    from dynaneural.temporal_wise.video.visualize import plot_timelines

    torch.manual_seed(int(recipe.train.get("seed", 0)))
    d = load_fsdd_logmel(data_dir=data_dir, **recipe.data, **recipe.options.get("features", {}))
    model = dn.create_model(recipe.model, frames=d.frames, n_mels=d.n_mels, **recipe.model_kwargs)
    train_s = _train(model, recipe, d.train_x, d.train_y, d.val_x, d.val_y, loss_fn=model.training_loss,
                     progress=progress, cache=training_dir(out, "audio", recipe.model, recipe.model_kwargs,
                                                           recipe.train, recipe.data, recipe.options))
    static_acc, static = _static_acc(model, d.test_x, d.test_y)
    rows: list[Any] = []

    def extra(res: dict[str, Any]) -> dict[str, Any]:
        steps = res["decisions"]["frames"]
        return {"frames_seen_fraction": float(steps.float().mean()),
                "mean_exit_step": float(res["decisions"]["exit_step"].float().mean()),
                "seconds_read": float(steps.float().sum(1).mean()) * model.chunk * d.settings["hop_length"] / 8000}

    for budget in recipe.calibration.budgets:
        try:
            model.calibrate(d.val_x, budget=float(budget))
        except ValueError as e:
            print(f"audio_exit: budget {budget} not reachable: {e}")
            continue
        rows += _row("audio_exit", model, static, d.test_x, d.test_y, static_acc=static_acc, budget=float(budget),
                     batch_sizes=recipe.bench.batch_sizes, bench=recipe.bench, extra_fn=extra, stream=True)
    res = _accuracy(lambda xb: model(xb, mode="execute"), d.test_x[::12], d.test_y[::12])[1]
    plot_timelines(res["decisions"]["frames"], out / "audio_exit_timelines.png", labels=d.test_y[::12],
                   preds=res["logits"].argmax(-1), step_name="50 ms chunk",
                   title="early exit over time on spoken digits (dark = chunks read)")
    return rows, {"train_s": train_s, "frames": d.frames, "n_mels": d.n_mels, "features": d.settings}


# -------------------------------------------------------------------------------------------------- fusion
def _run_fusion(recipe: Any, *, data_dir: Any, out: Path, progress: bool) -> tuple[list[Any], dict[str, Any]]:
    import torch

    import dynaneural as dn
    from dynaneural.bench.cache import training_dir
    from dynaneural.data import load_dataset
    from dynaneural.temporal_wise.audio.fsdd_features import load_fsdd_logmel
    from dynaneural.temporal_wise.audio.fusion import AUDIO, BOTH, IMAGE, make_audio_visual_pairs

    opt = recipe.options
    seed = int(recipe.data.get("seed", 0))
    torch.manual_seed(int(recipe.train.get("seed", 0)))
    d = load_fsdd_logmel(data_dir=data_dir, **recipe.data, **opt.get("features", {}))
    mnist = load_dataset("mnist", data_dir=data_dir, seed=seed)
    corrupt = float(opt.get("corrupt", 0.5))
    x, y, _ = make_audio_visual_pairs(d.train_x, d.train_y, mnist.train_x, mnist.train_y, seed=seed,
                                      repeats=int(opt.get("train_repeats", 2)), corrupt=corrupt)
    vx, vy, _ = make_audio_visual_pairs(d.val_x, d.val_y, mnist.val_x, mnist.val_y, seed=seed + 1, corrupt=corrupt)
    tx, ty, tk = make_audio_visual_pairs(d.test_x, d.test_y, mnist.test_x, mnist.test_y, seed=seed + 2,
                                         repeats=int(opt.get("test_repeats", 3)), corrupt=corrupt)
    model = dn.create_model(recipe.model, seed=int(recipe.train.get("seed", 0)), frames=d.frames, n_mels=d.n_mels,
                            **recipe.model_kwargs)
    train_s = _train(model, recipe, x, y, vx, vy, loss_fn=None, progress=progress,
                     cache=training_dir(out, "fusion", recipe.model, recipe.model_kwargs, recipe.train, recipe.data,
                                        opt))
    static_acc, static = _static_acc(model, tx, ty)

    def extra(res: dict[str, Any]) -> dict[str, Any]:
        m = res["decisions"]["modality"]
        correct = res["logits"].argmax(-1) == ty
        e = {f"{name}_fraction": float((m == k).float().mean()) for k, name in
             ((AUDIO, "audio_only"), (IMAGE, "image_only"), (BOTH, "both"))}
        for k, name in ((0, "clean"), (1, "audio_corrupted"), (2, "image_corrupted")):
            sel = tk == k
            e[f"accuracy_{name}"] = float(correct[sel].float().mean())
            e[f"both_fraction_{name}"] = float((m[sel] == BOTH).float().mean())
        return e

    rows: list[Any] = []
    for budget in recipe.calibration.budgets:
        try:
            model.calibrate(vx, budget=float(budget))
        except ValueError as e:
            print(f"fusion: budget {budget} not reachable: {e}")
            continue
        rows += _row("gated_fusion", model, static, tx, ty, static_acc=static_acc, budget=float(budget),
                     batch_sizes=recipe.bench.batch_sizes, bench=recipe.bench, extra_fn=extra)
    return rows, {"train_s": train_s, "corrupt": corrupt, "pairs": {"train": len(y), "val": len(vy), "test": len(ty)}}
