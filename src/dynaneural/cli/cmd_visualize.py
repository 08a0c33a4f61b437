"""``dynaneural visualize``: pictures of where a spatially dynamic model computed (PNG).

Kinds are provided by the families' visualisation modules, imported lazily, each exposing
``VISUALIZE_KINDS: dict[str, Callable[[model, images, out_dir], list[Path]]]``:
``dynaneural.spatial_wise.pixel.visualize`` (``pixel-mask``) and ``dynaneural.spatial_wise.token.visualize`` /
``dynaneural.spatial_wise.region.visualize`` (regions, tokens) where they exist.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from typing import Any

__all__ = ["PROVIDERS", "available_kinds", "register"]

PROVIDERS = ("dynaneural.spatial_wise.pixel.visualize", "dynaneural.spatial_wise.token.visualize",
             "dynaneural.spatial_wise.region.visualize")


def available_kinds() -> dict[str, Callable[..., Any]]:
    """Every picture kind of the providers that exist (a provider not written yet is skipped)."""
    kinds: dict[str, Callable[..., Any]] = {}
    for name in PROVIDERS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        kinds.update(getattr(mod, "VISUALIZE_KINDS", {}))
    return kinds


def cmd_visualize(args: argparse.Namespace) -> int:
    import torch

    from dynaneural.data import load_dataset
    from dynaneural.engine import load_model

    kinds = available_kinds()
    if args.kind not in kinds:
        raise ValueError(f"unknown picture kind {args.kind!r}; available: {sorted(kinds)}")
    model = load_model(args.model_checkpoint)
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    x = data.test_x if args.split == "test" else data.val_x
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(x.shape[0], generator=g)[:args.num_images]
    paths = kinds[args.kind](model, x[idx], args.out)
    print(json.dumps({"kind": args.kind, "files": [str(p) for p in paths]}, indent=2))
    return 0


def register(sub: Any, *, common: Callable[[argparse.ArgumentParser], None],
             data_opts: Callable[[argparse.ArgumentParser], None]) -> None:
    v = sub.add_parser("visualize", help="PNG pictures of where a spatially dynamic model computed")
    v.add_argument("--model-checkpoint", required=True, help="a checkpoint written by dynaneural (safetensors)")
    v.add_argument("--kind", required=True, help="picture kind, e.g. pixel-mask (see the error for all kinds)")
    v.add_argument("--dataset", required=True, help="dataset the images come from")
    v.add_argument("--split", default="test", choices=["test", "val"])
    v.add_argument("--num-images", type=int, default=8)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default="runs/visualize")
    data_opts(v)
    v.set_defaults(fn=cmd_visualize)
