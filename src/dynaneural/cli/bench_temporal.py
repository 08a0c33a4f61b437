"""``dynaneural bench temporal --method {skip-lstm,skip-gru,jump,stop,partial}``: sequence models, timed and on SST-2.

Two kinds of rows, both with the shared :class:`~dynaneural.bench.rows.SpeedupRow` keys:

* ``timing`` rows (``--sizes``): an untrained model over random feature sequences, its knob calibrated to a
  target fraction of work (``--target``, e.g. 50 % skipped updates), timed against the *fused* static
  ``nn.LSTM``/``nn.GRU`` with the same weights (interleaved medians, one run);
* ``sst2`` rows: the model trained on SST-2 (bucketed batches, Adam), its dev accuracy, FLOPs, fraction of tokens
  read / updates, and wall-clock against a plain LSTM trained the same way (the full-reading model).

Other families' temporal benches live in their own modules (``bench_temporal_media``); this one keeps to text.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["METHODS", "TASKS", "evaluate_feature_model", "evaluate_text_model", "register", "task_rows",
           "train_feature_model", "train_text_model"]

#: method -> (feature-input registry model for timing, SST-2 registry model, knob range (lo, hi))
METHODS: dict[str, dict[str, Any]] = {
    "skip-lstm": {"timing": ("skip_lstm", {"cell": "lstm"}), "sst2": "skip_lstm_sst2", "knob": (0.05, 1.0)},
    "skip-gru": {"timing": ("skip_lstm", {"cell": "gru"}), "sst2": "skip_gru_sst2", "knob": (0.05, 1.0)},
    "jump": {"timing": None, "sst2": "lstm_jump_sst2", "knob": None},
    "stop": {"timing": None, "sst2": "early_stop_lstm_sst2", "knob": (0.5, 1.0)},
    "partial": {"timing": ("skim_lstm", {}), "sst2": "skim_lstm_sst2", "knob": (0.0, 1.0)},
}


# ------------------------------------------------------------------------------------------------ helpers
def _work_fraction(out: Any) -> torch.Tensor:
    """(B,) fraction of steps where the model did its main work (updates / tokens read)."""
    d = out.decisions
    if "read_fraction" in d:  # models that know each text's length: the share of its own tokens read
        return d["read_fraction"].float()
    key = "updates" if "updates" in d else "read"
    return d[key].float().mean(1)


def _batches(x: torch.Tensor, lengths: torch.Tensor, batch_size: int, *, padding: str, shuffle: bool,
             generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Index batches of similar lengths (sorted, then shuffled as batches): little padding per batch."""
    noise = torch.rand(len(lengths), generator=generator) if shuffle else torch.zeros(len(lengths))
    order = torch.argsort(lengths.float() + noise, stable=True)
    groups = list(torch.split(order, batch_size))
    if shuffle:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return groups


def _trim(x: torch.Tensor, lengths: torch.Tensor, *, padding: str) -> torch.Tensor:
    n = max(1, int(lengths.max()))
    return x[:, x.shape[1] - n:] if padding == "left" else x[:, :n]


def train_text_model(model: torch.nn.Module, data: Any, *, epochs: int, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 0, max_steps: int | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Adam on SST-2 with length-bucketed batches; the model's ``loss(out, y)`` if it has one, else CE + aux."""
    from dynaneural.contract import set_train_progress

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * math.ceil(len(data.train_y) / batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    history, step = [], 0
    loss_fn = getattr(model, "loss", None)
    for epoch in range(epochs):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for idx in _batches(data.train_x, data.train_len, batch_size, padding=data.padding, shuffle=True,
                            generator=gen):
            xb = _trim(data.train_x[idx], data.train_len[idx], padding=data.padding)
            yb = data.train_y[idx]
            set_train_progress(model, step / max(total, 1))
            out = model(xb)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss = loss_fn(out, yb)["loss"] if callable(loss_fn) else F.cross_entropy(logits, yb)
            for v in getattr(out, "aux_losses", {}).values():
                loss = loss + v
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            if step >= total:
                break
        val = evaluate_text_model(model, data.val_x, data.val_y, data.val_len, padding=data.padding)
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "val_acc": val["accuracy"],
                        "seconds": time.perf_counter() - t0})
        log(f"  epoch {epoch + 1}: loss {history[-1]['loss']:.4f} val_acc {val['accuracy']:.4f} "
            f"({history[-1]['seconds']:.0f} s)")
        if step >= total:
            break
    model.eval()
    return history


@torch.inference_mode()
def evaluate_text_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor, *,
                        padding: str, batch_size: int = 128, mode: str = "execute") -> dict[str, Any]:
    """Accuracy, mean FLOPs, mean work fraction over length-bucketed batches (static nets: logits only)."""
    was = model.training
    model.eval()
    correct, cost, work, batches = 0, 0.0, 0.0, []
    for idx in _batches(x, lengths, batch_size, padding=padding, shuffle=False):
        xb = _trim(x[idx], lengths[idx], padding=padding)
        batches.append(xb)
        out = model(xb, mode=mode) if hasattr(model, "all_on") else model(xb)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        correct += int((logits.argmax(-1) == y[idx]).sum())
        if not isinstance(out, torch.Tensor):
            cost += float(out.cost.sum())
            work += float(_work_fraction(out).sum())
    model.train(was)
    n = len(y)
    return {"accuracy": correct / n, "mean_flops": cost / n, "work_fraction": work / n, "batches": batches}


def _time_batches(static_fn: Callable, dynamic_fn: Callable, batches: list[torch.Tensor], *, repeats: int
                  ) -> dict[str, float]:
    from dynaneural.bench.timing import compare

    n = sum(b.shape[0] for b in batches)
    with torch.inference_mode():
        cmp = compare(lambda: [static_fn(b) for b in batches], lambda: [dynamic_fn(b) for b in batches],
                      repeats=repeats, warmup=1)
    return {"realized_speedup": cmp.speedup, "static_ms_per_sample": cmp.baseline_s * 1e3 / n,
            "dynamic_ms_per_sample": cmp.candidate_s * 1e3 / n, "timed_samples": n}


# ------------------------------------------------------------------------------------------------- timing
def timing_rows(method: str, *, sizes: list[tuple[int, int, int, int]], target: float, repeats: int,
                seed: int = 0, log: Callable[[str], None] = print) -> list[Any]:
    """Untrained model, knob calibrated so that ``target`` of the steps do the full work; timed vs fused static."""
    import dynaneural as dn
    from dynaneural.bench.rows import SpeedupRow
    from dynaneural.calibration import calibrate_knob
    from dynaneural.compute.flops import static_flops

    spec = METHODS[method]
    if spec["timing"] is None:
        log(f"  {method}: no synthetic timing (its savings depend on trained jump/stop policies); see sst2 rows")
        return []
    name, kw = spec["timing"]
    rows = []
    for batch, hidden, feat, steps in sizes:
        torch.manual_seed(seed)
        model = dn.create_model(name, input_size=feat, hidden_size=hidden, max_len=steps, **kw).eval()
        gate = getattr(model, "gate", None) or model.policy
        with torch.no_grad():  # spread the untrained policy's probabilities so samples take different paths
            gate.weight.mul_(8.0 / max(float(gate.weight.norm()), 1e-6))
        x = torch.randn(batch, steps, feat, generator=torch.Generator().manual_seed(seed))

        def frac(knob: float, model: Any = model, x: torch.Tensor = x) -> float:
            model.set_threshold(knob)
            with torch.inference_mode():
                return float(_work_fraction(model(x, mode="execute")).mean())

        lo, hi = spec["knob"]
        cal = calibrate_knob(mean_cost=frac, set_knob=model.set_threshold, budget=target, lo=lo, hi=hi,
                             tol=0.02, iters=25)
        static = model.to_static().eval()
        with torch.inference_mode():
            out = model(x, mode="execute")
        full = static_flops(static, x[:1])
        mean_flops = float(out.cost.mean())
        t = _time_batches(static, lambda b, model=model: model(b, mode="execute"), [x], repeats=repeats)
        theo = full / mean_flops
        extra_timing: dict[str, float] = {}
        if getattr(model, "schedule", None) == "rounds":  # the step-synchronous schedule, for comparison
            model.schedule = "steps"
            extra_timing["realized_speedup_steps_schedule"] = _time_batches(
                static, lambda b, model=model: model(b, mode="execute"), [x], repeats=repeats)["realized_speedup"]
            model.schedule = "rounds"
        if getattr(model, "pack", False):  # addmm instead of oneDNN's packed GEMM, for comparison
            model.pack = False
            extra_timing["realized_speedup_addmm"] = _time_batches(
                static, lambda b, model=model: model(b, mode="execute"), [x], repeats=repeats)["realized_speedup"]
            model.pack = True
        row = SpeedupRow(method=method, batch_size=batch, accuracy=math.nan, mean_flops=mean_flops,
                         static_flops=full, theoretical_speedup=theo, realized_over_theoretical=t["realized_speedup"] / theo,
                         budget=target, unit="work_fraction", achieved_budget=float(_work_fraction(out).mean()),
                         budget_error=float(_work_fraction(out).mean()) - target, **t,
                         extra={"kind": "timing", "hidden_size": hidden, "input_size": feat, "steps": steps,
                                "knob": cal.knob, "skipped_fraction": 1 - float(_work_fraction(out).mean()),
                                "baseline": f"fused nn.{'GRU' if kw.get('cell') == 'gru' else 'LSTM'}",
                                "schedule": getattr(model, "schedule", None), **extra_timing,
                                "threads": torch.get_num_threads()})
        log(f"  B={batch} H={hidden} F={feat} T={steps}: work {row.achieved_budget:.3f} theoretical "
            f"{theo:.2f}x realized {row.realized_speedup:.2f}x"
            + "".join(f"; {k.removeprefix('realized_speedup_')} {v:.2f}x" for k, v in extra_timing.items()))
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------- SST-2
def sst2_rows(method: str, *, data_dir: str | None, epochs: int, train_limit: int | None, repeats: int,
              budgets: list[float], seed: int = 0, out_dir: Path | None = None, model_name: str | None = None,
              model_kwargs: dict[str, Any] | None = None, batch_size: int = 64, lr: float = 2e-3,
              val_split: str = "phrases", log: Callable[[str], None] = print) -> list[Any]:
    import dynaneural as dn
    from dynaneural.bench.rows import SpeedupRow
    from dynaneural.calibration import calibrate_knob
    from dynaneural.data.sst2 import load_sst2
    from dynaneural.temporal_wise.sequence.common import RecurrentBackbone, StaticRecurrentClassifier

    data = load_sst2(data_dir=data_dir, train_limit=train_limit, seed=seed, val_split=val_split)  # type: ignore[arg-type]
    log(f"SST-2: {data.sizes}, vocabulary {data.vocab_size}, validation: {val_split}")
    model_name = model_name or METHODS[method]["sst2"]
    model = dn.create_model(model_name, seed=seed, vocab_size=data.vocab_size, **(model_kwargs or {}))
    # the full-reading baseline ends on the last word (left padding); a reader that starts at the text and stops
    # at its end (early stop) declares right padding: it gets the same splits and vocabulary padded that way
    base_data = data
    if getattr(model, "padding_side", "left") != data.padding:
        data = load_sst2(data_dir=data_dir, train_limit=train_limit, seed=seed, val_split=val_split,  # type: ignore[arg-type]
                         padding=model.padding_side)
        log(f"{model_name} reads {data.padding}-padded batches")
    cell = "gru" if method == "skip-gru" else "lstm"
    torch.manual_seed(seed)
    base = StaticRecurrentClassifier(RecurrentBackbone(cell=cell, hidden_size=model.backbone.hidden_size,
                                                       num_classes=2, vocab_size=data.vocab_size,
                                                       embed_dim=model.backbone.feature_size))
    cache = None
    if out_dir is not None:  # the full-reading baseline is the same for every method: train it once per setting
        cache = out_dir / (f"full_{cell}_h{model.backbone.hidden_size}_e{model.backbone.feature_size}_ep{epochs}"
                           f"_n{len(data.train_y)}_v{data.vocab_size}_s{seed}"
                           + ("" if val_split == "phrases" else f"_val{val_split}") + ".safetensors")
    if cache is not None and cache.is_file():
        from safetensors.torch import load_file

        base.load_state_dict(load_file(str(cache)))
        base_hist = [{"val_acc": evaluate_text_model(base, base_data.val_x, base_data.val_y, base_data.val_len,
                                                     padding=base_data.padding)["accuracy"]}]
        log(f"loaded the full-reading {cell.upper()} from {cache}")
    else:
        log(f"training the full-reading {cell.upper()} ({epochs} epochs)")
        base_hist = train_text_model(base, base_data, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                                     log=log)
        if cache is not None:
            from safetensors.torch import save_file

            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(cache))
    log(f"training {model_name} ({epochs} epochs)")
    hist = train_text_model(model, data, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, log=log)
    base_eval = evaluate_text_model(base, base_data.test_x, base_data.test_y, base_data.test_len,
                                    padding=base_data.padding)
    step, head = model.backbone.step_flops, model.backbone.head_flops
    static_flops = sum(b.shape[0] * (b.shape[1] * step + head) for b in base_eval["batches"]) / len(data.test_y)
    if out_dir is not None:
        from dynaneural.engine import save_model

        out_dir.mkdir(parents=True, exist_ok=True)
        tag = method if seed == 0 else f"{method}-seed{seed}"  # the baseline's cache name carries the seed too
        save_model(model, out_dir / f"{tag}.safetensors", extras={"history": hist})
        _timeline_png(model, data, out_dir / f"timelines_{tag}.png", title=f"{model_name} on SST-2 dev")
    rows = []
    knob_points: list[float | None] = [None]
    if METHODS[method]["knob"] is not None and budgets:
        knob_points += budgets
    for budget in knob_points:
        cal_knob = None
        if budget is not None:
            lo, hi = METHODS[method]["knob"]

            def frac(knob: float) -> float:
                model.set_threshold(knob)
                return evaluate_text_model(model, data.val_x, data.val_y, data.val_len,
                                           padding=data.padding)["work_fraction"]

            try:
                cal = calibrate_knob(mean_cost=frac, set_knob=model.set_threshold, budget=budget, lo=lo, hi=hi,
                                     tol=0.02, iters=20, current=model.threshold)
                cal_knob = cal.knob
            except ValueError as e:
                log(f"  budget {budget}: {e}")
                continue
        ev = evaluate_text_model(model, data.test_x, data.test_y, data.test_len, padding=data.padding)
        sim = evaluate_text_model(model, data.test_x, data.test_y, data.test_len, padding=data.padding,
                                  mode="simulate")
        t = _time_batches(base, lambda b: model(b, mode="execute"), ev["batches"], repeats=repeats)
        theo = static_flops / ev["mean_flops"]
        rows.append(SpeedupRow(
            method=method, batch_size=128, accuracy=ev["accuracy"], static_accuracy=base_eval["accuracy"],
            mean_flops=ev["mean_flops"], static_flops=static_flops, theoretical_speedup=theo,
            realized_over_theoretical=t["realized_speedup"] / theo, budget=budget if budget is not None else math.nan,
            unit="work_fraction", achieved_budget=ev["work_fraction"], **t,
            extra={"kind": "sst2", "model": model_name, "knob": cal_knob if cal_knob is not None else
                   getattr(model, "threshold", None), "tokens_read" if method in ("jump", "stop") else
                   "updated_fraction": ev["work_fraction"], "skipped_fraction": 1 - ev["work_fraction"],
                   "simulate_accuracy": sim["accuracy"], "epochs": epochs, "train_limit": train_limit,
                   "val_acc": hist[-1]["val_acc"], "static_val_acc": base_hist[-1]["val_acc"],
                   "dataset": "sst2 (dev as test)", "val_split": val_split, "seed": seed}))
        log(f"  {method} budget {budget}: acc {ev['accuracy']:.4f} (full reading {base_eval['accuracy']:.4f}) "
            f"work {ev['work_fraction']:.3f} theoretical {theo:.2f}x realized {t['realized_speedup']:.2f}x")
    return rows


# ------------------------------------------------------------------------------- adding task, FSDD (Skip RNN)
#: feature-sequence tasks on which the Skip RNN is trained next to a full-updating LSTM of the same size
TASKS = ("adding", "fsdd")


@dataclass(frozen=True, eq=False)
class _TaskData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    regression: bool


def _task_data(task: str, *, data_dir: str | None, seed: int, opts: dict[str, Any]) -> _TaskData:
    if task == "adding":
        from dynaneural.temporal_wise.sequence.tasks import make_adding_task

        steps = int(opts.get("steps", 50))
        tr, va, te = (make_adding_task(int(opts.get(k, d)), steps=steps, seed=seed + i) for i, (k, d) in
                      enumerate((("n_train", 100_000), ("n_val", 2000), ("n_test", 5000))))
        return _TaskData(tr.x, tr.y, va.x, va.y, te.x, te.y, regression=True)
    if task == "fsdd":
        from dynaneural.temporal_wise.audio.fsdd_features import load_fsdd_logmel

        d = load_fsdd_logmel(data_dir=data_dir, seed=seed, val_size=int(opts.get("n_val", 300)),
                             frames=int(opts.get("frames", 100)))
        k = int(opts.get("stack", 1))  # k consecutive 10 ms frames make one step (k·n_mels features)
        if k < 1 or d.frames % k:
            raise ValueError(f"stack must be a positive divisor of the {d.frames} frames, got {k}")

        def steps(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], x.shape[1] // k, k * x.shape[2])

        return _TaskData(steps(d.train_x), d.train_y, steps(d.val_x), d.val_y, steps(d.test_x), d.test_y,
                         regression=False)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _task_loss(out: Any, y: torch.Tensor, *, regression: bool) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss = F.mse_loss(logits.squeeze(-1), y) if regression else F.cross_entropy(logits, y)
    for v in getattr(out, "aux_losses", {}).values():
        loss = loss + v
    return loss


def train_feature_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
                        lr: float, regression: bool, seed: int = 0, log: Callable[[str], None] = print,
                        log_every: int = 500) -> list[dict]:
    """Adam + cosine over ``steps`` random mini-batches of fixed-length feature sequences (MSE or CE + aux)."""
    from dynaneural.contract import set_train_progress

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    model.train()
    history, t0, run = [], time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        set_train_progress(model, step / steps)
        loss = _task_loss(model(x[idx]), y[idx], regression=regression)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            history.append({"step": step + 1, "loss": run / n, "seconds": time.perf_counter() - t0})
            log(f"  step {step + 1}/{steps}: loss {run / n:.5f} ({history[-1]['seconds']:.0f} s)")
            run = 0.0
    model.eval()
    return history


@torch.inference_mode()
def evaluate_feature_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, regression: bool,
                           batch_size: int = 256, mode: str = "execute", tolerance: float = 0.05) -> dict[str, Any]:
    """Accuracy (classification; adding task: within ``tolerance``), MSE (adding), mean FLOPs and work fraction."""
    from dynaneural.temporal_wise.sequence.tasks import adding_accuracy

    was = model.training
    model.eval()
    preds, cost, work, batches = [], 0.0, 0.0, []
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size]
        batches.append(xb)
        out = model(xb, mode=mode) if hasattr(model, "all_on") else model(xb)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        preds.append(logits.squeeze(-1) if regression else logits.argmax(-1))
        if not isinstance(out, torch.Tensor):
            cost += float(out.cost.sum())
            work += float(_work_fraction(out).sum())
    model.train(was)
    pred, n = torch.cat(preds), len(y)
    res: dict[str, Any] = (adding_accuracy(pred, y, tolerance=tolerance) if regression
                           else {"accuracy": float((pred == y).double().mean())})
    return {**res, "mean_flops": cost / n, "work_fraction": work / n, "batches": batches}


def task_rows(method: str, task: str, *, data_dir: str | None, opts: dict[str, Any], budgets: list[float],
              repeats: int, seed: int = 0, out_dir: Path | None = None, log: Callable[[str], None] = print
              ) -> list[Any]:
    """Skip RNN and a full-updating RNN of the same size, trained alike on ``task``; the Skip RNN's θ calibrated
    to each budget (fraction of steps updating) on the validation split; test accuracy, FLOPs, wall-clock."""
    import dynaneural as dn
    from dynaneural.bench.rows import SpeedupRow
    from dynaneural.calibration import calibrate_knob
    from dynaneural.temporal_wise.sequence.common import RecurrentBackbone, StaticRecurrentClassifier

    if method not in ("skip-lstm", "skip-gru"):
        raise ValueError(f"--task runs the Skip RNN methods (skip-lstm, skip-gru), not {method!r}")
    data = _task_data(task, data_dir=data_dir, seed=seed, opts=opts)
    reg = data.regression
    n_out = 1 if reg else int(data.train_y.max()) + 1
    steps, feat = data.train_x.shape[1], data.train_x.shape[2]
    cell = "gru" if method == "skip-gru" else "lstm"
    hidden = int(opts.get("hidden_size", 128))
    fit = dict(steps=int(opts.get("train_steps", 2000)), batch_size=int(opts.get("batch_size", 256)),
               lr=float(opts.get("lr", 0.01)), regression=reg, seed=seed, log=log)
    log(f"{task}: train {tuple(data.train_x.shape)}, val {len(data.val_y)}, test {len(data.test_y)}; "
        f"{cell.upper()} {hidden}")
    torch.manual_seed(seed)
    base = StaticRecurrentClassifier(RecurrentBackbone(cell=cell, hidden_size=hidden, num_classes=n_out,
                                                       input_size=feat))
    log(f"training the full-updating {cell.upper()} ({fit['steps']} steps)")
    base_hist = train_feature_model(base, data.train_x, data.train_y, **fit)
    torch.manual_seed(seed)
    model = dn.create_model("skip_lstm", cell=cell, input_size=feat, hidden_size=hidden, num_classes=n_out,
                            max_len=steps, budget=float(opts.get("budget", 0.5)),
                            budget_weight=float(opts.get("budget_weight", 1.0)),
                            gate_bias=float(opts.get("gate_bias", 1.0)))
    log(f"training the Skip {cell.upper()} (budget loss to {opts.get('budget', 0.5)} updates)")
    hist = train_feature_model(model, data.train_x, data.train_y, **fit)
    if out_dir is not None:
        from dynaneural.engine import save_model

        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, out_dir / f"{method}_{task}.safetensors", extras={"history": hist})
    base_eval = evaluate_feature_model(base, data.test_x, data.test_y, regression=reg)
    static_flops = float(steps * model.backbone.step_flops + model.backbone.head_flops)
    rows: list[Any] = []
    trained = model.threshold
    for budget in [None, *budgets]:
        knob = trained
        if budget is not None:
            def frac(k: float) -> float:
                model.set_threshold(k)
                return evaluate_feature_model(model, data.val_x, data.val_y, regression=reg)["work_fraction"]

            try:
                knob = calibrate_knob(mean_cost=frac, set_knob=model.set_threshold, budget=budget, lo=0.05, hi=1.0,
                                      tol=0.02, iters=20, current=trained).knob
            except ValueError as e:
                log(f"  budget {budget}: {e}")
                continue
        else:
            model.set_threshold(trained)
        ev = evaluate_feature_model(model, data.test_x, data.test_y, regression=reg)
        sim = evaluate_feature_model(model, data.test_x, data.test_y, regression=reg, mode="simulate")
        t = _time_batches(base, lambda b: model(b, mode="execute"), ev["batches"], repeats=repeats)
        theo = static_flops / ev["mean_flops"]
        extra = {"kind": task, "knob": knob, "updated_fraction": ev["work_fraction"],
                 "skipped_fraction": 1 - ev["work_fraction"], "simulate_accuracy": sim["accuracy"],
                 "hidden_size": hidden, "steps": steps, "train_steps": fit["steps"],
                 "final_loss": hist[-1]["loss"], "static_final_loss": base_hist[-1]["loss"]}
        if reg:
            extra.update(mse=ev["mse"], static_mse=base_eval["mse"], solved=ev["solved"],
                         static_solved=base_eval["solved"], tolerance=ev["tolerance"])
        rows.append(SpeedupRow(
            method=method, batch_size=256, accuracy=ev["accuracy"], static_accuracy=base_eval["accuracy"],
            mean_flops=ev["mean_flops"], static_flops=static_flops, theoretical_speedup=theo,
            realized_over_theoretical=t["realized_speedup"] / theo, budget=budget if budget is not None else math.nan,
            unit="work_fraction", achieved_budget=ev["work_fraction"], **t, extra=extra))
        log(f"  {task} budget {budget}: acc {ev['accuracy']:.4f} (full updating {base_eval['accuracy']:.4f})"
            + (f" mse {ev['mse']:.2e} (full {base_eval['mse']:.2e})" if reg else "")
            + f" updates {ev['work_fraction']:.3f} theoretical {theo:.2f}x realized {t['realized_speedup']:.2f}x")
    model.set_threshold(trained)
    return rows


def _timeline_png(model: Any, data: Any, path: Path, *, title: str, n: int = 12) -> Path:
    """What the trained model read on the first ``n`` dev sentences (trimmed to the longest)."""
    from dynaneural.temporal_wise.sequence.visualize import plot_timelines, timeline_codes

    x = _trim(data.test_x[:n], data.test_len[:n], padding=data.padding)
    with torch.inference_mode():
        out = model.eval()(x, mode="execute")
    codes = timeline_codes(out, x, skip_code=5 if "updates" in out.decisions and hasattr(model, "small") else 2)
    tokens = [[data.vocab.itos[int(t)] if int(t) else "" for t in row] for row in x]
    labels = [f"{data.classes[int(y)][:3]}→{data.classes[int(p)][:3]}" for y, p in
              zip(data.test_y[:n], out.logits.argmax(-1), strict=True)]
    return plot_timelines(codes, path, tokens=tokens, row_labels=labels, title=title)


# ---------------------------------------------------------------------------------------------------- CLI
def kernel_rows(*, hidden: int = 512, feat: int = 128, rows: tuple[int, ...] = (64, 128, 256), repeats: int = 21
                ) -> list[dict[str, Any]]:
    """The Skip LSTM step's kernels, timed interleaved: its GEMM (``[x_t, h]`` × stacked weights) with oneDNN's
    packed weight against ``addmm``, and ``tanh`` against ``sigmoid`` on the same (rows, hidden) tensor."""
    from dynaneural.bench.timing import compare
    from dynaneural.layers.lstm import cat_lstm_weights, onednn_linear_available, pack_linear_weight

    lstm = torch.nn.LSTM(feat, hidden)
    w_cat, b_cat = cat_lstm_weights(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, True)
    out: list[dict[str, Any]] = []
    with torch.inference_mode():
        w_packed = pack_linear_weight(w_cat, onednn_linear_available())
        for n in rows:
            a = torch.randn(n, feat + hidden)
            macs = n * (feat + hidden) * 4 * hidden
            row: dict[str, Any] = {"kind": "kernel", "rows": n, "hidden_size": hidden, "input_size": feat}
            if w_packed is not None:
                cmp = compare(lambda a=a: torch.addmm(b_cat, a, w_cat),
                              lambda a=a: torch.ops.mkldnn._linear_pointwise(a, w_packed, b_cat, "none", [], ""),
                              repeats=repeats)
                row.update(gemm_packed_over_addmm=cmp.speedup, addmm_gmacs=macs / cmp.baseline_s / 1e9,
                           packed_gmacs=macs / cmp.candidate_s / 1e9)
            z = torch.randn(n, hidden)
            act = compare(lambda z=z: torch.tanh(z), lambda z=z: torch.sigmoid(z), repeats=repeats)
            row.update(tanh_over_sigmoid_time=act.speedup, tanh_us=act.baseline_s * 1e6,
                       sigmoid_us=act.candidate_s * 1e6)
            out.append(row)
    return out


def _size(text: str) -> tuple[int, int, int, int]:
    try:
        b, h, f, t = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be BATCHxHIDDENxFEATURESxSTEPS, got {text!r}") from None
    return b, h, f, t


def cmd_bench_temporal(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator
    from dynaneural.recipes import load_recipe

    _maybe_reexec_with_tuned_allocator(args)
    recipe = load_recipe(args.recipe or f"temporal_sequence_{args.method.replace('-', '_')}")
    if args.quick:
        recipe = recipe.quick_variant()
    opts = recipe.options
    threads = args.threads or opts.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    rows: list[Any] = []
    target = args.target if args.target is not None else float(opts.get("target", 0.5))
    if args.kernels:
        krows = kernel_rows(repeats=recipe.bench.repeats * 3)
        print(format_rows(krows, list(krows[0])))
        rows += krows
    if not args.no_timing:
        sizes = args.sizes or [tuple(int(v) for v in sz) for sz in opts.get("timing_sizes", [])]
        print(f"timing {args.method} at {target:.0%} work against the fused static net", flush=True)
        rows += timing_rows(args.method, sizes=sizes, target=target, repeats=recipe.bench.repeats)
    for task in args.task or []:
        task_opts = dict((opts.get("tasks") or {}).get(task, {}))
        if args.quick:
            task_opts.update(train_steps=min(int(task_opts.get("train_steps", 2000)), 30), n_train=512, n_val=256,
                             n_test=256)
        rows += task_rows(args.method, task, data_dir=args.data_dir, opts=task_opts,
                          budgets=list(task_opts.get("budgets", [])), repeats=recipe.bench.repeats,
                          seed=int(recipe.train.get("seed", 0)),
                          out_dir=Path(args.out) if args.out else None)
    if args.sst2:
        train = recipe.train
        seeds = args.seeds or [int(train.get("seed", 0))]
        sst_rows: list[Any] = []
        for seed in seeds:
            sst_rows += sst2_rows(args.method, data_dir=args.data_dir, epochs=args.epochs or int(train.get("epochs", 3)),
                                  train_limit=args.train_limit or recipe.data.get("train_limit"),
                                  repeats=recipe.bench.repeats, budgets=list(recipe.calibration.budgets),
                                  out_dir=Path(args.out) if args.out else None, model_name=recipe.model,
                                  model_kwargs=recipe.model_kwargs, batch_size=int(train.get("batch_size", 64)),
                                  lr=float(train.get("lr", 2e-3)), seed=seed,
                                  val_split=str(recipe.data.get("val_split", "phrases")))
        rows += sst_rows
        if len(seeds) > 1:
            summary = seed_summary(sst_rows)
            for r in summary:
                print(f"  over seeds {seeds}, budget {r['budget']}: accuracy {r['accuracy_mean']:.4f} ± "
                      f"{r['accuracy_std']:.4f} (full reading {r['static_accuracy_mean']:.4f}), Δ "
                      f"{r['delta_pp_mean']:+.2f} ± {r['delta_pp_std']:.2f} pp, work {r['work_mean']:.3f}")
            rows += summary
    speed_rows = [r for r in rows if not (isinstance(r, dict) and r.get("kind") in ("kernel", "sst2_seed_summary"))]
    if speed_rows:
        print(format_rows(speed_rows, ["method", "batch_size", "budget", "achieved_budget", "accuracy",
                                       "static_accuracy", "theoretical_speedup", "realized_speedup",
                                       "realized_over_theoretical"]))
    if args.json:
        path = write_bench_json(args.json, rows, family="temporal-sequence", method=args.method,
                                recipe=recipe.name)
        print(f"wrote {path}")
    return 0


def seed_summary(rows: list[Any]) -> list[dict[str, Any]]:
    """Per budget (the trained knob is budget NaN): mean and sample standard deviation over the seeds' SST-2 rows
    of the accuracy, the full-reading accuracy, their difference (each seed against its own full-reading model)
    and the work fraction."""
    import statistics

    def sd(v: list[float]) -> float:
        return statistics.stdev(v) if len(v) > 1 else 0.0

    groups: dict[str, list[Any]] = {}
    for r in rows:
        groups.setdefault("trained" if math.isnan(r.budget) else f"{r.budget:g}", []).append(r)
    out = []
    for key, rs in groups.items():
        acc = [r.accuracy for r in rs]
        base = [r.static_accuracy for r in rs]
        delta = [100 * (a - b) for a, b in zip(acc, base, strict=True)]
        work = [r.achieved_budget for r in rs]
        out.append({"kind": "sst2_seed_summary", "method": rs[0].method, "budget": key,
                    "seeds": [r.extra.get("seed") for r in rs], "accuracy_mean": statistics.mean(acc),
                    "accuracy_std": sd(acc), "static_accuracy_mean": statistics.mean(base),
                    "static_accuracy_std": sd(base), "delta_pp_mean": statistics.mean(delta),
                    "delta_pp_std": sd(delta), "delta_pp": delta, "work_mean": statistics.mean(work),
                    "work_max": max(work)})
    return out


def register(bsub: Any, *, common: Callable[[argparse.ArgumentParser], None],
             data_opts: Callable[[argparse.ArgumentParser], None]) -> None:
    p = bsub.add_parser("temporal", help="sequence models (Skip RNN, LSTM-Jump, early stop, Skim-RNN): timing "
                        "against fused nn.LSTM/GRU and SST-2 accuracy")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--recipe", default=None, help="default: temporal_sequence_<method> (see `dynaneural recipes`)")
    p.add_argument("--sizes", type=_size, nargs="+", default=None, help="timing sizes BATCHxHIDDENxFEATURESxSTEPS")
    p.add_argument("--target", type=float, default=None, help="fraction of steps doing full work (timing rows)")
    p.add_argument("--no-timing", action="store_true", help="skip the synthetic timing rows")
    p.add_argument("--kernels", action="store_true",
                   help="also time the Skip LSTM step's kernels (packed vs addmm GEMM, tanh vs sigmoid)")
    p.add_argument("--sst2", action="store_true", help="train on SST-2 and add accuracy rows")
    p.add_argument("--task", choices=TASKS, nargs="+", default=None,
                   help="Skip RNN only: train on the adding task / FSDD log-mel next to a full-updating RNN")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="SST-2: train and evaluate with each seed (model init, data order, validation split), "
                        "the full-reading baseline too, and summarise mean ± sd (default: the recipe's seed)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    p.add_argument("--quick", action="store_true", help="smoke-sized run")
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="folder for checkpoints")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_temporal)


if __name__ == "__main__":  # pragma: no cover
    from dynaneural.cli.main import main

    sys.exit(main(["bench", "temporal", *sys.argv[1:]]))
