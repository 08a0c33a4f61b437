"""``dynaneural bench layer-skip``: SkipNet, ConvNet-AIG and BlockDrop on a shared pretrained ResNet.

Writes :class:`~dynaneural.bench.rows.SpeedupRow` JSON rows (the early-exit bench's keys, plus
``blocks_executed_fraction`` and the other layer-skip keys) and a per-class block-usage plot per budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def cmd_bench_layer_skip(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator, resolve_recipe
    from dynaneural.sample_wise.layer_skip.bench import run_layer_skip_bench

    _maybe_reexec_with_tuned_allocator(args)
    recipe = resolve_recipe(args, prefix=f"layer_skip_{args.method}")
    out = Path(args.out or f"runs/bench-{recipe.name}")
    def log(line: str) -> None:  # one line per stage (training runs without progress bars)
        print(line, flush=True)

    result = run_layer_skip_bench(recipe, method=args.method, out_dir=out, data_dir=args.data_dir, log=log)
    rows = result["rows"]
    cols = ["method", "budget", "batch_size", "accuracy", "static_accuracy", "accuracy_loss_pp", "mean_flops",
            "theoretical_speedup", "realized_speedup", "realized_over_theoretical", "blocks_executed_fraction"]
    print(format_rows(rows, cols))
    if args.json:
        path = write_bench_json(args.json, rows, recipe=recipe.name, method=args.method, dataset=recipe.dataset,
                                quick=bool(args.quick), backbone=result["backbone"])
        print(f"wrote {path}")
    return 0 if rows else 1


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    from dynaneural.cli.main import add_dataset_option

    p = bsub.add_parser("layer-skip", help="layer skipping (SkipNet, ConvNet-AIG, BlockDrop): calibrate budgets, "
                                           "time against the full ResNet")
    p.add_argument("--method", required=True, choices=["skipnet", "aig", "blockdrop"])
    add_dataset_option(p, default="cifar10", choices=["cifar10", "mnist", "fashion-mnist"])
    p.add_argument("--recipe", default=None, help="default: layer_skip_<method>_<dataset>")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--out", default=None, help="run folder (plots); default runs/bench-<recipe>")
    p.add_argument("--epochs", type=int, default=None, help="override the method's training epochs")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_layer_skip)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
