"""``dynaneural bench moe-accuracy``: an MoE model against its dense twin of equal *active* FLOPs.

The question the sparse-MoE papers answer (Shazeer et al. 2017; Fedus et al., "Switch Transformers", 2022): at the
same compute per token, do more parameters behind a router buy accuracy? Both sides are the recipe's model
(:class:`~dynaneural.sample_wise.moe.moe_transformer.MoETransformer`, or
:class:`~dynaneural.sample_wise.moe.moe_mlp.MoEMLP` with one token per sample) built from its ``model_kwargs`` and
trained with the same recipe, seed and data order. The dense twin has ``num_experts=1``, ``top_k=1`` and an FFN of
width ``top_k × hidden + shared_hidden`` — one always-on SwiGLU expert with the MoE's active width (its router over
one expert costs D MACs per token and always gives weight 1); an MoE with a shared expert (``shared_hidden``,
DeepSeekMoE) is thus compared with the same dense twin as one whose routed experts alone are that wide. Each row:
test accuracy in execute mode, mean FLOPs from the ledger, parameter count, how well both fit un-augmented training
images, and the realized speed-up of the MoE against the dense twin, interleaved in one run.

``options.augment: cifar`` trains both with random crops and flips. ``options.upcycle`` adds the sparse-upcycling
comparison: the trained dense twin continued for a few epochs, against the same twin upcycled into an MoE and trained
as long (:func:`_upcycle_rows`). With ``--out`` both trainings checkpoint into
folders keyed by their settings (``bench.cache.training_dir``): a cut run resumes, a finished one is reused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run_moe_accuracy_bench"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_and_evaluate(name: str, model: Any, settings: dict[str, Any], ckpt: Any, data: Any, augment: Any,
                        log: Any) -> Any:
    """Train ``model`` with ``settings`` (resumable in ``ckpt``), log and return its execute-mode test result."""
    from dynaneural.engine import TrainConfig, evaluate, train

    t0 = time.perf_counter()
    train(model, train_x=data.train_x, train_y=data.train_y,
          config=TrainConfig.from_dict({**settings, "checkpoint_dir": ckpt}), augment=augment)
    model.eval()
    res = evaluate(model, data.test_x, data.test_y, mode="execute")
    log(f"{name}: {_params(model) / 1e3:.1f} k parameters, test accuracy {res.accuracy:.4f}, "
        f"{float(res.mean_cost) / 1e6:.3f} MFLOPs/sample ({time.perf_counter() - t0:.0f} s)")
    return res


def training_fit(model: Any, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> dict[str, float]:
    """How well ``model`` fits training images ``x`` (un-augmented): mean cross-entropy and accuracy in execute mode.

    Beside test accuracy this separates a model that underfits (higher training loss: too little training for its
    parameters) from one that overfits (lower training loss, lower test accuracy).
    """
    was_training = model.training
    model.eval()
    ce, correct = 0.0, 0
    try:
        with torch.inference_mode():
            for i in range(0, x.shape[0], batch_size):
                logits = model(x[i:i + batch_size], mode="execute").logits
                target = y[i:i + batch_size]
                ce += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
                correct += int((logits.argmax(-1) == target).sum())
    finally:
        model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return {"cross_entropy": ce / n, "accuracy": correct / n}


def _comparison_rows(method: str, models: tuple[Any, Any], results: tuple[Any, Any], recipe: Any, data: Any,
                     log: Any, *, names: tuple[str, str], extra: dict[str, Any] | None = None) -> list[Any]:
    """One row per timed batch size: the sparse model (second) against its dense reference (first) — accuracies,
    FLOPs, parameters and the realized speed-up, the two interleaved in one run — and how well each fits the first
    ``options.fit_samples`` (default 2 000) training images, un-augmented (:func:`training_fit`)."""
    from dynaneural.bench.rows import SpeedupRow, time_against_static

    (dense_model, sparse_model), (dense, sparse) = models, results
    n_fit = int(recipe.options.get("fit_samples", 2000))
    fits = [training_fit(m, data.train_x[:n_fit], data.train_y[:n_fit]) for m in (dense_model, sparse_model)]
    log(f"  training fit on {min(n_fit, int(data.train_x.shape[0]))} un-augmented training images: "
        f"{names[0]} CE {fits[0]['cross_entropy']:.4f} acc {fits[0]['accuracy']:.4f}, "
        f"{names[1]} CE {fits[1]['cross_entropy']:.4f} acc {fits[1]['accuracy']:.4f}")
    fit_extra = {"train_fit_cross_entropy": fits[1]["cross_entropy"], "train_fit_accuracy": fits[1]["accuracy"],
                 "dense_train_fit_cross_entropy": fits[0]["cross_entropy"],
                 "dense_train_fit_accuracy": fits[0]["accuracy"], "train_fit_samples": n_fit}
    x_time = data.test_x[: recipe.bench.timed_samples]
    rows = []
    for bs in recipe.bench.batch_sizes:
        t = time_against_static(lambda xb: dense_model(xb, mode="execute"),
                                lambda xb: sparse_model(xb, mode="execute"), x_time, batch_size=bs,
                                repeats=recipe.bench.repeats)
        theo = float(dense.mean_cost) / float(sparse.mean_cost)
        gain = (sparse.accuracy - dense.accuracy) * 100
        rows.append(SpeedupRow(
            method=method, batch_size=bs, accuracy=sparse.accuracy, static_accuracy=dense.accuracy,
            mean_flops=float(sparse.mean_cost), static_flops=float(dense.mean_cost), theoretical_speedup=theo,
            realized_over_theoretical=t["realized_speedup"] / theo, **t,
            extra={"moe_params": _params(sparse_model), "dense_params": _params(dense_model), "accuracy_gain_pp": gain,
                   **fit_extra, **(extra or {})}))
        log(f"  batch {bs}: {names[1]} {sparse.accuracy:.4f} vs {names[0]} {dense.accuracy:.4f} ({gain:+.2f} pp), "
            f"realized {t['realized_speedup']:.2f}× (FLOPs ratio {theo:.3f})")
    return rows


def run_moe_accuracy_bench(recipe: Any, *, data_dir: str | None = None, out_dir: str | Path | None = None,
                           log: Any = print) -> dict[str, Any]:
    """Train the MoE model and its dense twin of equal active FLOPs; returns ``{rows, meta}``."""
    from dynaneural.bench.cache import training_dir
    from dynaneural.data import augmentation, load_dataset
    from dynaneural.registry import create_model

    augment_name = recipe.options.get("augment")
    augment = augmentation(augment_name)
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    kw = dict(recipe.model_kwargs)
    top_k, hidden = int(kw.get("top_k", 2)), int(kw.get("hidden", 128))
    if kw.get("routing", "top_k") != "top_k":
        raise ValueError("moe-accuracy compares top-k routing against its dense twin; got routing "
                         f"{kw.get('routing')!r}")
    shared = int(kw.get("shared_hidden") or 0)
    # Options that only shape the routing (a weight of exactly 1 for one expert either way) are dropped, so the MoE
    # variants of one recipe share their trained dense twin.
    dense_kw = {**{k: v for k, v in kw.items() if k not in ("shared_hidden", "straight_through_weights")},
                "num_experts": 1, "top_k": 1, "hidden": top_k * hidden + shared, "capacity_factor": None}
    settings = {**recipe.train, "progress": False}
    models: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for name, mkw in (("dense", dense_kw), ("moe", kw)):
        torch.manual_seed(int(recipe.train.get("seed", 0)))
        models[name] = create_model(recipe.model, **mkw)
        ckpt = training_dir(out_dir, name, recipe.model, mkw, recipe.data, recipe.dataset, settings, augment_name)
        results[name] = _train_and_evaluate(name, models[name], settings, ckpt, data, augment, log)
    method = f"moe_top{top_k}_of_{kw.get('num_experts', 8)}" + (f"_shared{shared}" if shared else "")
    rows = _comparison_rows(method, (models["dense"], models["moe"]),
                            (results["dense"], results["moe"]), recipe, data, log, names=("dense", "MoE"))
    meta = {"dataset": recipe.dataset, "train_samples": int(data.train_x.shape[0]), "moe_kwargs": kw,
            "dense_kwargs": dense_kw, "augment": augment_name}
    if recipe.options.get("upcycle"):
        rows += _upcycle_rows(recipe, models["dense"], dense_kw, data, augment, augment_name, out_dir, meta, log)
    return {"rows": rows, "meta": meta}


def _upcycle_rows(recipe: Any, dense: Any, dense_kw: dict[str, Any], data: Any, augment: Any, augment_name: Any,
                  out_dir: str | Path | None, meta: dict[str, Any], log: Any) -> list[Any]:
    """``options.upcycle``: continue the trained dense twin for ``epochs`` more, once as itself and once upcycled into
    ``num_experts`` experts routed top-``top_k`` (Komatsuzaki et al. 2023), both with the recipe's training settings
    overridden by ``lr`` / ``warmup_epochs`` / ``epochs``; rows compare the upcycled MoE with the continued dense
    model. With ``top_k=1`` the two have the same active FLOPs."""
    import copy

    from dynaneural.bench.cache import training_dir
    from dynaneural.sample_wise.moe.upcycle import upcycle

    opts = dict(recipe.options["upcycle"])
    num_experts, top_k = int(opts.pop("num_experts", 8)), int(opts.pop("top_k", 1))
    unknown = set(opts) - {"epochs", "lr", "warmup_epochs"}
    if unknown:
        raise ValueError(f"options.upcycle: unknown keys {sorted(unknown)} (known: num_experts, top_k, epochs, lr, "
                         "warmup_epochs)")
    first = {**recipe.train, "progress": False}
    settings = {**first, **opts}
    seed = int(recipe.train.get("seed", 0))
    models = {"dense_continued": copy.deepcopy(dense).train(),
              "upcycled": upcycle(dense, num_experts=num_experts, top_k=top_k, seed=seed).train()}
    results = {}
    for name, model in models.items():
        ckpt = training_dir(out_dir, name, recipe.model, {**dense_kw, "upcycle": [num_experts, top_k]}, recipe.data,
                            recipe.dataset, {"first": first, "then": settings}, augment_name)
        results[name] = _train_and_evaluate(name, model, settings, ckpt, data, augment, log)
    meta["upcycle"] = {"num_experts": num_experts, "top_k": top_k, "continued_training": settings}
    return _comparison_rows(f"upcycled_top{top_k}_of_{num_experts}", (models["dense_continued"], models["upcycled"]),
                            (results["dense_continued"], results["upcycled"]), recipe, data, log,
                            names=("dense continued", "upcycled"), extra={"reference": "dense twin continued"})


def seed_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Across training seeds, per method: both accuracies, the MoE's gain (pp) over its dense twin of equal active
    FLOPs, its mean, spread and one-sided paired tests (:func:`dynaneural.bench.stats.gain_statistics`)."""
    from dynaneural.bench.stats import gain_statistics

    out: dict[str, Any] = {}
    for seed, res in sorted(per_seed.items()):
        first = {}  # per method, its first row: accuracies do not depend on the timed batch size
        for r in res["rows"]:
            first.setdefault(r.method, r)
        for r in first.values():
            m = out.setdefault(r.method, {"seeds": [], "accuracy": [], "dense_accuracy": [], "gain_pp": []})
            m["seeds"].append(seed)
            m["accuracy"].append(r.accuracy)
            m["dense_accuracy"].append(r.static_accuracy)
            m["gain_pp"].append(r.extra["accuracy_gain_pp"])
    for m in out.values():
        m.update(gain_statistics(m["gain_pp"], prefix="gain"))
    return out


def _report(summary: dict[str, Any]) -> list[str]:
    from dynaneural.bench.stats import format_p

    return [f"{method}: gain over the dense twin {m['gain_pp_mean']:+.2f} ± {m['gain_pp_std'] or 0:.2f} pp over "
            f"seeds {m['seeds']} (ahead on {m['gain_seeds_ahead']} of {len(m['seeds'])}; one-sided p: t-test "
            f"{format_p(m['gain_t_test_p'])}, sign test {format_p(m['gain_sign_test_p'])})"
            for method, m in summary.items()]


def cmd_bench_moe_accuracy(args: argparse.Namespace) -> int:
    from dynaneural.cli.main import run_recipe_bench_over_seeds

    return run_recipe_bench_over_seeds(
        args, prefix="moe_accuracy", summarise=seed_summary, report=_report,
        run=lambda recipe, data_dir, out_dir=None: run_moe_accuracy_bench(
            recipe, data_dir=data_dir, out_dir=out_dir, log=lambda s: print(s, flush=True)))


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    from dynaneural.cli.main import add_dataset_option, add_seed_options

    p = bsub.add_parser("moe-accuracy", help="MoE model vs its dense twin of equal active FLOPs")
    add_dataset_option(p, default="mnist", choices=["mnist", "fashion-mnist", "cifar10"])
    p.add_argument("--recipe", default=None, help="default: moe_accuracy_<dataset>")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    add_seed_options(p, seeds_help="train and compare once per seed; one JSON with every seed and a summary of "
                                    "the gain")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the timing rows")
    p.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/moe_accuracy_mnist.json)")
    p.add_argument("--out", default=None, help="folder for resumable, reusable training checkpoints "
                                               "(e.g. runs/bench-moe-accuracy); default: none kept")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_moe_accuracy)
