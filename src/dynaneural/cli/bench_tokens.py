"""``dynaneural bench tokens``: ViT token pruning (DynamicViT), halting (A-ViT) and merging (ToMe) vs the static ViT.

Trains the recipe's static ViT backbone (the DynamicViT model with pruning disabled is exactly it), fine-tunes
DynamicViT (ratio loss) and A-ViT (ponder + distributional prior) from it, applies ToMe without training, then
calibrates each method's one knob to the recipe's kept-token budget (mean over blocks of the fraction of tokens a
block processes, ``options.keep_tokens``) on the validation split, and writes one
:class:`~dynaneural.bench.rows.SpeedupRow` per (method, batch size): test accuracy in execute mode, mean FLOPs from
the ledger, theoretical speed-up and realized speed-up against the static ViT, timed interleaved in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run_token_bench"]


def _train(model: torch.nn.Module, recipe: Any, data: Any, *, epochs: int, seed_offset: int = 0,
           checkpoint_dir: Path | None = None, lr: float | None = None) -> None:
    """Train with the recipe's settings (``lr`` overrides the peak learning rate, for fine-tuning); with a
    ``checkpoint_dir`` an interrupted run resumes and a finished one is reused as it is (the folder name carries a
    digest of the model, data and training settings)."""
    from dynaneural.engine import TrainConfig, train

    over = {} if lr is None else {"lr": float(lr)}
    cfg = TrainConfig.from_dict({**recipe.train, **over, "epochs": epochs, "progress": False,
                                 "seed": int(recipe.train.get("seed", 0)) + seed_offset,
                                 "warmup_epochs": min(float(recipe.train.get("warmup_epochs", 0.0)), epochs),
                                 "checkpoint_dir": checkpoint_dir})
    train(model, train_x=data.train_x, train_y=data.train_y, config=cfg)
    model.eval()


def run_token_bench(recipe: Any, *, data_dir: str | None = None, out_dir: str | Path | None = None,
                    log: Any = print) -> dict[str, Any]:
    """Train, calibrate and time the token methods; returns ``{rows, meta}``.

    With ``out_dir`` every training run checkpoints under ``<out_dir>/checkpoints`` (resumable; reused when the
    same settings are run again, so re-timing or re-calibrating costs no training)."""
    from dynaneural.bench.cache import run_digest, training_dir
    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.data import load_dataset
    from dynaneural.engine import evaluate
    from dynaneural.registry import create_model

    opts = recipe.options
    keep = float(opts.get("keep_tokens", 0.6))
    methods = list(opts.get("methods", ["dynamicvit", "avit", "tome"]))
    finetune = int(opts.get("finetune_epochs", 1))
    ft_lr = opts.get("finetune_lr")  # None: the backbone's peak learning rate
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    bench = recipe.bench
    torch.manual_seed(int(recipe.train.get("seed", 0)))
    t0 = time.perf_counter()
    backbone_key = run_digest(recipe.model, recipe.model_kwargs, recipe.data, recipe.train, recipe.dataset)
    base = create_model(recipe.model, **recipe.model_kwargs, threshold=0.0)  # pruning off: the static ViT
    _train(base, recipe, data, epochs=int(recipe.train.get("epochs", 3)), checkpoint_dir=training_dir(out_dir, "backbone", backbone_key))
    static = base.vit.eval()
    static_acc = evaluate(static, data.test_x, data.test_y).accuracy
    static_flops = base.cost.static_total()
    log(f"static ViT: test accuracy {static_acc:.4f}, {static_flops / 1e6:.2f} MFLOPs ({time.perf_counter() - t0:.0f} s)")
    # The fine-tuned methods get `finetune` more epochs than the backbone: so does their static reference.
    static_ft_acc = static_acc
    if finetune > 0 and any(m in ("dynamicvit", "avit") for m in methods):
        ref = create_model(recipe.model, **recipe.model_kwargs, threshold=0.0)
        ref.load_state_dict(base.state_dict())
        _train(ref, recipe, data, epochs=finetune, seed_offset=100, lr=ft_lr,
               checkpoint_dir=training_dir(out_dir, "static-finetuned", backbone_key, finetune,
                                           *([] if ft_lr is None else [ft_lr])))
        static_ft_acc = evaluate(ref.vit, data.test_x, data.test_y).accuracy
        log(f"static ViT fine-tuned {finetune} more epoch(s): test accuracy {static_ft_acc:.4f}")
    meta: dict[str, Any] = {"dataset": recipe.dataset, "train_samples": int(data.train_x.shape[0]),
                            "static_accuracy": static_acc, "static_finetuned_accuracy": static_ft_acc,
                            "static_flops": static_flops, "keep_tokens": keep, "vit": base.cfg.vit.to_dict(),
                            "finetune_epochs": finetune, "finetune_lr": ft_lr}
    vit_keys = ("dim", "depth", "heads", "mlp_ratio", "num_classes", "stem")
    kw = {k: v for k, v in recipe.model_kwargs.items() if k in vit_keys}
    family = recipe.dataset.replace("-", "_") if recipe.dataset == "cifar10" else "mnist"
    rows: list[SpeedupRow] = []
    x_time = data.test_x[: bench.timed_samples]
    for i, method in enumerate(methods):
        t1 = time.perf_counter()
        model = create_model(f"{method}_{family}", **kw, **opts.get(f"{method}_kwargs", {}))
        model.vit.load_state_dict(base.vit.state_dict())
        if hasattr(model, "set_teacher") and opts.get("distill", True):
            model.set_teacher(static)  # the paper's teacher: the backbone before fine-tuning (frozen)
        ref_acc = static_acc
        if method in ("dynamicvit", "avit") and finetune > 0:
            _train(model, recipe, data, epochs=finetune, seed_offset=i + 1, lr=ft_lr,
                   checkpoint_dir=training_dir(out_dir, method, backbone_key, finetune, i,
                                                 opts.get(f"{method}_kwargs", {}), bool(opts.get("distill", True)),
                                                 *([] if ft_lr is None else [ft_lr])))
            ref_acc = static_ft_acc
        if hasattr(model, "set_teacher"):
            model.set_teacher(None)
        cal = model.calibrate(data.val_x[: int(opts.get("calibration_samples", 2000))], budget=keep, unit="tokens")
        res = evaluate(model, data.test_x, data.test_y, mode="execute")
        with torch.inference_mode():
            tok = torch.cat([model(data.test_x[j:j + 512], mode="execute").decisions["tokens"]
                             for j in range(0, data.test_x.shape[0], 512)]).double()
        kept = float(tok.mean()) / model.cfg.vit.num_tokens
        mean_flops = float(res.mean_cost)
        theo = static_flops / mean_flops
        knob = float(getattr(model, "halt_threshold" if method == "avit" else "threshold"))
        log(f"{method}: accuracy {res.accuracy:.4f} ({(ref_acc - res.accuracy) * 100:+.2f} pp loss), kept tokens "
            f"{kept:.3f}, FLOPs {mean_flops / static_flops:.3f} of static, knob {knob:.4g} "
            f"({time.perf_counter() - t1:.0f} s)")
        for bs in bench.batch_sizes:
            xs = x_time if bs > 1 else x_time[: bench.timed_samples_batch1]
            t = time_against_static(static, lambda xb, m=model: m(xb, mode="execute"), xs, batch_size=bs,
                                    repeats=bench.repeats)
            rows.append(SpeedupRow(
                method=method, batch_size=bs, accuracy=res.accuracy, mean_flops=mean_flops, static_flops=static_flops,
                theoretical_speedup=theo, realized_over_theoretical=t["realized_speedup"] / theo, budget=keep,
                unit="kept_tokens", achieved_budget=kept, budget_error=kept / keep - 1, static_accuracy=ref_acc,
                **t, extra={"knob": knob, "calibration_val_kept": cal.mean_cost,
                            "kept_tokens_per_block": [float(v) / model.cfg.vit.num_tokens for v in tok.mean(0)],
                            "per_sample_kept_std": float((tok.mean(1) / model.cfg.vit.num_tokens).std())}))
            log(f"  batch {bs}: realized {t['realized_speedup']:.2f}× (theoretical {theo:.2f}×)")
    meta["seconds"] = time.perf_counter() - t0
    return {"rows": rows, "meta": meta}


def cmd_bench_tokens(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator, resolve_recipe

    _maybe_reexec_with_tuned_allocator(args)
    torch.set_num_threads(args.threads)
    recipe = resolve_recipe(args, prefix="tokens")  # applies --methods
    out = run_token_bench(recipe, data_dir=args.data_dir, out_dir=args.out, log=lambda s: print(s, flush=True))
    print(format_rows(out["rows"]))
    if args.json:
        path = write_bench_json(args.json, out["rows"], recipe=recipe.name, **out["meta"])
        print(f"wrote {path}", file=sys.stderr)
    return 0


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    from dynaneural.cli.main import add_dataset_option

    p = bsub.add_parser("tokens", help="ViT token pruning (DynamicViT), halting (A-ViT), merging (ToMe)")
    add_dataset_option(p, default="mnist", choices=["mnist", "fashion-mnist", "cifar10"])
    p.add_argument("--recipe", default=None, help="default: tokens_<dataset>")
    p.add_argument("--methods", default=None, help="comma-separated subset of dynamicvit,avit,tome")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the static backbone")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timing is per thread count)")
    p.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/tokens_mnist.json)")
    p.add_argument("--out", default=None, help="folder for resumable, reusable training checkpoints "
                                               "(e.g. runs/bench-tokens); default: none kept")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_tokens)


