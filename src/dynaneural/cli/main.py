"""``dynaneural`` command line: demo, train, calibrate, eval, bench, models, recipes.

Every command is a thin layer over the library: it parses arguments, calls one function, prints a summary and
writes structured results (JSON) where asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _maybe_reexec_with_tuned_allocator(args: argparse.Namespace) -> None:
    """Benchmarks run under the same allocator settings on both sides (shared/FEASIBILITY.md): the glibc
    variables only take effect at process start, so re-execute once with them set."""
    from dynaneural.bench.timing import tuned_allocator_env

    if getattr(args, "no_allocator_tuning", False):
        return
    env = tuned_allocator_env()
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "dynaneural.cli.main", *sys.argv[1:]], env)


def _recipe(args: argparse.Namespace) -> Any:
    from dynaneural.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    overrides: dict[str, Any] = {}
    if getattr(args, "epochs", None):
        overrides["epochs"] = args.epochs
    if getattr(args, "seed", None) is not None:  # another training seed (init and data order); data split kept
        overrides["seed"] = int(args.seed)
    if getattr(args, "methods", None):
        recipe.options["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if overrides:
        recipe.train.update(overrides)
    return recipe.quick_variant() if getattr(args, "quick", False) else recipe


def resolve_recipe(args: argparse.Namespace, *, prefix: str) -> Any:
    """The recipe of a ``bench`` command: ``--recipe`` if given, else ``<prefix>_<dataset>``. ``--dataset`` defaults to
    the recipe's dataset (else to the command's ``default_dataset``); given both, they must agree."""
    if not args.recipe:
        dataset = args.dataset or args.default_dataset
        args.recipe = f"{prefix}_{dataset.replace('-', '_')}"
    recipe = _recipe(args)
    if args.dataset is None:
        args.dataset = recipe.dataset
    elif recipe.dataset != args.dataset:
        raise SystemExit(f"recipe {recipe.name} is for dataset {recipe.dataset}, not {args.dataset}")
    return recipe


def add_dataset_option(parser: argparse.ArgumentParser, *, default: str, choices: list[str]) -> None:
    """``--dataset``: default the recipe's when ``--recipe`` is given, else ``default``."""
    parser.add_argument("--dataset", default=None, choices=choices,
                        help=f"default: the recipe's dataset, else {default}")
    parser.set_defaults(default_dataset=default)


def run_recipe_bench(args: argparse.Namespace, *, prefix: str, run: Any) -> int:
    """The body every recipe-driven ``bench`` command shares: tuned allocator, the recipe (default
    ``<prefix>_<dataset>``), ``run(recipe, data_dir=...) -> {"rows": [...], "meta": {...}}``, a table, the JSON."""
    import torch

    from dynaneural.bench.rows import format_rows, write_bench_json

    _maybe_reexec_with_tuned_allocator(args)
    recipe = resolve_recipe(args, prefix=prefix)
    torch.set_num_threads(args.threads)
    extra = {"out_dir": args.out} if getattr(args, "out", None) else {}  # benches that keep checkpoints
    res = run(recipe, data_dir=args.data_dir, **extra)
    print(format_rows(res["rows"]))
    if args.json:
        path = write_bench_json(args.json, res["rows"], recipe=recipe.name, **res["meta"])
        print(f"wrote {path}", file=sys.stderr)
    return 0


def study_digest(recipe: Any) -> str:
    """A digest of everything in ``recipe`` but its training seed: the runs of one seed study share it, so seeds
    measured by separate runs (``--from-json``) are only pooled when they ran the same experiment."""
    from dynaneural.bench.cache import run_digest

    train = {k: v for k, v in recipe.train.items() if k != "seed"}
    return run_digest(recipe.name, recipe.model, recipe.dataset, recipe.model_kwargs, recipe.data, train,
                      vars(recipe.calibration), vars(recipe.bench), recipe.options)


def _measured_seeds(paths: list[str], digest: str) -> dict[int, dict[str, Any]]:
    """``{seed: {"rows", "meta", "from"}}`` from earlier ``--seeds`` JSONs of the same study (same digest)."""
    from dynaneural.bench.rows import SpeedupRow

    found: dict[int, dict[str, Any]] = {}
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--from-json {path}: cannot read a bench JSON ({e})") from None
        if not isinstance(doc, dict) or "per_seed_meta" not in doc or "rows" not in doc:
            raise SystemExit(f"--from-json {path}: not the JSON of a --seeds run (no per_seed_meta)")
        if doc.get("study_digest") != digest:
            raise SystemExit(f"--from-json {path}: another experiment (study digest {doc.get('study_digest')}, "
                             f"this run's is {digest}): only seeds of the same recipe and settings are pooled")
        for key, meta in doc["per_seed_meta"].items():
            seed = int(key)
            if seed in found:
                raise SystemExit(f"--from-json: seed {seed} is in both {found[seed]['from']} and {path}")
            rows = [SpeedupRow.from_dict(r) for r in doc["rows"] if r.get("seed") == seed]
            if not rows:
                raise SystemExit(f"--from-json {path}: seed {seed} has metadata but no rows")
            found[seed] = {"rows": rows, "meta": meta, "from": path}
    return found


def run_recipe_bench_over_seeds(args: argparse.Namespace, *, prefix: str, run: Any,
                                summarise: Any, report: Any) -> int:
    """``run_recipe_bench`` once per seed of ``args.seeds`` (each overrides the recipe's training seed:
    initialisation and data order; the data split stays), then one JSON holding every seed's rows (each with
    ``extra["seed"]``), ``per_seed_meta`` and ``summary = summarise({seed: {rows, meta}})``; ``report(summary)``
    returns the lines printed at the end. Without ``--seeds`` it is ``run_recipe_bench``.

    A seed study may outlast one run: the JSON is rewritten after every seed (``complete`` false until the last),
    so a cut run keeps the seeds it finished, and ``--from-json`` takes the seeds that earlier runs of the same
    study already measured from their JSONs instead of training them again."""
    if not args.seeds:
        if getattr(args, "from_json", None):
            raise SystemExit("--from-json pools the seeds of a --seeds study: give --seeds too")
        return run_recipe_bench(args, prefix=prefix, run=run)
    if args.seed is not None:
        raise SystemExit("give either --seed or --seeds, not both")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    _maybe_reexec_with_tuned_allocator(args)
    digest = study_digest(resolve_recipe(args, prefix=prefix))
    earlier = _measured_seeds(list(getattr(args, "from_json", None) or []), digest)
    per_seed: dict[int, dict[str, Any]] = {}

    def one_seed(recipe: Any, **kw: Any) -> dict[str, Any]:
        per_seed[args.seed] = res = run(recipe, **kw)
        for r in res["rows"]:
            r.extra["seed"] = args.seed
        return res

    def write(summary: Any) -> None:
        from dynaneural.bench.rows import write_bench_json

        done = [s for s in args.seeds if s in per_seed]
        rows = [r for s in done for r in per_seed[s]["rows"]]
        path = write_bench_json(json_path, rows, recipe=args.recipe, study_digest=digest, seeds=done,
                                seeds_requested=list(args.seeds), complete=len(done) == len(args.seeds),
                                seeds_from_json={s: earlier[s]["from"] for s in done if s in earlier},
                                per_seed_meta={s: per_seed[s]["meta"] for s in done}, summary=summary)
        print(f"wrote {path} ({len(done)} of {len(args.seeds)} seeds)", file=sys.stderr)

    json_path = args.json
    args.json = None  # one JSON for every seed, below
    for seed in args.seeds:
        if seed in earlier:
            print(f"seed {seed}: measured before, taken from {earlier[seed]['from']}", flush=True)
            per_seed[seed] = {"rows": earlier[seed]["rows"], "meta": earlier[seed]["meta"]}
        else:
            args.seed = seed
            run_recipe_bench(args, prefix=prefix, run=one_seed)
        if json_path and seed != args.seeds[-1]:
            write(summarise({s: per_seed[s] for s in args.seeds if s in per_seed}))
    summary = summarise({s: per_seed[s] for s in args.seeds})
    for line in report(summary):
        print(line)
    if json_path:
        write(summary)
    return 0


def add_seed_options(parser: argparse.ArgumentParser, *, seeds_help: str) -> None:
    """``--seed``, ``--seeds`` and ``--from-json`` of a bench that runs :func:`run_recipe_bench_over_seeds`."""
    parser.add_argument("--seed", type=int, default=None, help="training seed (initialisation and data order; "
                                                                "the data split stays the recipe's); default: the "
                                                                "recipe's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=seeds_help)
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="with --seeds: take the seeds that these earlier --seeds JSONs of the same recipe "
                             "and settings measured instead of training them again (a study over several runs)")


def cmd_demo(args: argparse.Namespace) -> int:
    from dynaneural.bench.pipeline import format_table, run_early_exit_experiment
    from dynaneural.recipes import load_recipe

    _maybe_reexec_with_tuned_allocator(args)
    recipe = load_recipe("early_exit_digits")
    if args.quick:
        recipe = recipe.quick_variant()
    print(f"DynaNeural demo: multi-exit ConvNet on scikit-learn digits → {args.out}", flush=True)
    metrics = run_early_exit_experiment(recipe, out_dir=args.out, progress=not args.no_progress)
    print(format_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}, accuracy_vs_compute.png, exit_histogram.png, "
          f"model.safetensors ({metrics['seconds']:.0f} s)")
    return 0


def cmd_bench_early_exit(args: argparse.Namespace) -> int:
    from dynaneural.bench.pipeline import format_table, run_early_exit_experiment

    _maybe_reexec_with_tuned_allocator(args)
    recipe = resolve_recipe(args, prefix="early_exit")
    out = Path(args.out or f"runs/bench-{recipe.name}")
    metrics = run_early_exit_experiment(recipe, out_dir=out, data_dir=args.data_dir, progress=not args.no_progress)
    metrics["allocator"] = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")}
    metrics["command"] = "dynaneural " + " ".join(sys.argv[1:])
    print(format_table(metrics))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dynaneural.bench.pipeline import train_recipe_model
    from dynaneural.data import load_dataset
    from dynaneural.engine import evaluate, save_model

    recipe = _recipe(args)
    data = load_dataset(recipe.dataset, data_dir=args.data_dir, **recipe.data)
    out = Path(args.out)
    model = train_recipe_model(recipe, data, out_dir=out, tag="dynamic", progress=not args.no_progress)
    res = evaluate(model, data.val_x, data.val_y, mode="train")
    path = save_model(model, out / "model.safetensors", extras={"recipe": recipe.name, "val": res.to_dict()})
    print(json.dumps({"checkpoint": str(path), "val_exit_accuracy": res.exit_accuracy}, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dynaneural.calibration import calibrate_exits, measure_latency_profile
    from dynaneural.data import load_dataset
    from dynaneural.engine import load_model, read_checkpoint, save_model

    model = load_model(args.checkpoint)
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    latency = (measure_latency_profile(model, data.val_x[:512], batch_size=args.batch_size)
               if args.unit == "ms" else None)
    res = calibrate_exits(model, data.val_x, data.val_y, budget=args.budget, unit=args.unit, method=args.method,
                          rule=args.rule, latency=latency, latency_batch_size=args.batch_size if latency else None)
    extras = dict(read_checkpoint(args.checkpoint).extras or {})
    extras["calibration"] = res.to_dict()
    out = save_model(model, args.out or args.checkpoint, extras=extras)
    print(json.dumps({**res.to_dict(), "checkpoint": str(out)}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dynaneural.data import load_dataset
    from dynaneural.engine import evaluate, load_model

    model = load_model(args.checkpoint)
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    x, y = (data.test_x, data.test_y) if args.split == "test" else (data.val_x, data.val_y)
    res = evaluate(model, x, y, batch_size=args.batch_size, mode=args.mode)
    profile = model.cost_profile()
    d = res.to_dict()
    if res.mean_cost:
        d["theoretical_speedup"] = profile.static_total / res.mean_cost
    print(json.dumps(d, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dynaneural.registry import list_models

    print("\n".join(list_models(args.pattern)))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from dynaneural.recipes import list_recipes

    print("\n".join(list_recipes()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynaneural", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def data_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", default=None, help="data folder (default: $DYNANEURAL_DATA)")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--no-allocator-tuning", action="store_true",
                        help="do not re-execute with the glibc allocator settings used for benchmarks")

    d = sub.add_parser("demo", help="train, calibrate and benchmark a multi-exit net on the embedded digits")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a smoke-sized run (seconds)")
    common(d)
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train a model from a recipe")
    t.add_argument("--recipe", required=True, help="shipped recipe name (see `dynaneural recipes`) or a YAML path")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--quick", action="store_true")
    data_opts(t)
    common(t)
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("calibrate", help="fit exit thresholds to a budget on the validation split")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--dataset", required=True)
    c.add_argument("--budget", type=float, required=True)
    c.add_argument("--unit", default="fraction", choices=["fraction", "flops", "depth", "ms"])
    c.add_argument("--method", default="geometric", choices=["geometric", "search"])
    c.add_argument("--rule", default="confidence", choices=["confidence", "entropy", "patience", "learned"])
    c.add_argument("--batch-size", type=int, default=64, help="batch size the ms budget refers to")
    c.add_argument("--out", default=None, help="write the calibrated checkpoint here (default: in place)")
    data_opts(c)
    c.set_defaults(fn=cmd_calibrate)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--mode", default="execute", choices=["train", "simulate", "execute"])
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--batch-size", type=int, default=256)
    data_opts(e)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks: realized vs theoretical speed-up, as ratios in one run")
    bsub = b.add_subparsers(dest="bench", required=True)
    ee = bsub.add_parser("early-exit", help="early exit: calibrate budgets, time batch sizes, compare static nets")
    add_dataset_option(ee, default="mnist", choices=["digits", "mnist", "fashion-mnist", "cifar10"])
    ee.add_argument("--recipe", default=None, help="default: early_exit_<dataset>")
    ee.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    ee.add_argument("--json", default=None, help="write the rows here")
    ee.add_argument("--out", default=None, help="run folder (checkpoints, plots); default runs/bench-<recipe>")
    ee.add_argument("--epochs", type=int, default=None)
    data_opts(ee)
    common(ee)
    ee.set_defaults(fn=cmd_bench_early_exit)

    # Each family's bench command lives in its own module ``dynaneural/cli/bench_<family>.py`` exposing
    # ``register(subparsers, common=..., data_opts=...)``; they are found here so none can be forgotten.
    import importlib
    import pkgutil

    import dynaneural.cli as cli_pkg

    # Other top-level commands (e.g. ``visualize``) likewise live in ``dynaneural/cli/cmd_<name>.py``.
    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("bench_"):
            importlib.import_module(f"dynaneural.cli.{info.name}").register(bsub, common=common, data_opts=data_opts)
        elif info.name.startswith("cmd_"):
            importlib.import_module(f"dynaneural.cli.{info.name}").register(sub, common=common, data_opts=data_opts)

    m = sub.add_parser("models", help="list registered models")
    m.add_argument("pattern", nargs="?", default="*")
    m.set_defaults(fn=cmd_models)
    r = sub.add_parser("recipes", help="list shipped recipes")
    r.set_defaults(fn=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError, TypeError) as e:  # user errors: one clear line, no stack trace
        from dynaneural.engine import CheckpointError  # noqa: F401

        print(f"dynaneural {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from dynaneural.engine import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"dynaneural {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
