"""``dynaneural bench spatial``: pixel-level sparse execution against dense computation.

Two parts (``--part kernel|resnet|all``):

* ``kernel`` — one 3×3 convolution (C → C, batch B, S×S maps, stride 1) computed only at a random fraction of
  the output positions (``sparse_conv2d``: gather 3×3 neighbourhoods from NHWC, one oneDNN matrix multiply,
  scatter) and on the same fraction of 8×8 tiles (SBNet's ``block_sparse_conv2d``), against ``conv2d`` on the
  full map, timed interleaved in one run. One row per (method, density); the crossover density (where the
  realized speed-up falls to 1, interpolated) is reported beside the rows.
* ``resnet`` — the recipe's spatially gated ResNet (DynConv) on its dataset: the static ResNet is trained first,
  DynConv is fine-tuned from it with the sparsity (budget) loss while the static twin trains the same number of
  extra epochs; the gate threshold is calibrated to each budget on the validation split; test accuracy in
  execute mode, mean FLOPs from the ledger, and realized speed-up against the static ResNet (batch norm folded on
  both sides, channels-last on both sides), timed interleaved in one run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["crossover_density", "exact_mask", "layer_skip_state_to_pixel_resnet", "register", "run_kernel_bench",
           "run_resnet_bench"]


def crossover_density(densities: list[float], speedups: list[float]) -> float:
    """The density at which the realized speed-up crosses 1 (linear interpolation; NaN if it never does)."""
    pts = sorted(zip(densities, speedups, strict=True))
    for (d0, s0), (d1, s1) in zip(pts, pts[1:], strict=False):
        if s0 >= 1.0 > s1:
            return d0 + (s0 - 1.0) * (d1 - d0) / (s0 - s1)
    return math.nan if pts and pts[-1][1] < 1.0 or not pts else 1.0


def exact_mask(b: int, cells: int, density: float, g: torch.Generator) -> torch.Tensor:
    """(b, cells) bool with exactly ``round(density · cells)`` cells on per sample, at uniformly random places: the
    benchmarked density is then the stated one, not a Bernoulli draw around it."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    k = round(density * cells)
    rank = torch.rand(b, cells, generator=g).argsort(1).argsort(1)  # a random permutation per sample
    return rank < k


def _tile_mask(b: int, size: int, block: int, density: float, g: torch.Generator) -> torch.Tensor:
    t = -(-size // block)
    return exact_mask(b, t * t, density, g).view(b, t, t)


def run_kernel_bench(*, batch: int = 8, channels: int = 64, size: int = 56, densities: tuple[float, ...] = (
        0.1, 0.25, 0.5, 0.75), block: int | tuple[int, ...] = 8, repeats: int = 15, log: Any = print
                     ) -> dict[str, Any]:
    """Time sparse and block-sparse 3×3 convolutions against the dense one; returns ``{rows, meta}``.

    Per-pixel masks have exactly ``density`` of the positions of each sample on, at random places (the hardest
    case: no two active positions need to share a neighbourhood); tile masks exactly ``density`` of the
    ``block × block`` tiles (one row per tile size in ``block``)."""
    blocks = (block,) if isinstance(block, int) else tuple(block)
    from dynaneural.bench.rows import SpeedupRow
    from dynaneural.bench.timing import compare
    from dynaneural.spatial_wise.pixel.sbnet import block_sparse_conv2d, tile_mask_to_pixels
    from dynaneural.spatial_wise.pixel.sparse_conv import sparse_conv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
    bias = torch.randn(channels, generator=g)
    dense_flops = float(channels * 9 * channels * size * size)
    rows: list[SpeedupRow] = []
    with torch.inference_mode():
        for d in densities:
            pix = exact_mask(batch, size * size, d, g).view(batch, size, size)
            # exactness check on the timed inputs: the sparse result equals the dense one at active positions
            ref = F.conv2d(x, w, bias, padding=1)
            err = float((sparse_conv2d(x, w, bias, pix, padding=1) - ref * pix[:, None]).abs().max())
            cases = [("sparse_conv3x3", 1, pix, lambda m=pix: sparse_conv2d(x, w, bias, m, padding=1), err)]
            for bl in blocks:
                tiles = _tile_mask(batch, size, bl, d, g)
                tile_pix = tile_mask_to_pixels(tiles, bl, size, size)
                err_t = float((block_sparse_conv2d(x, w, bias, tiles, block=bl) - ref * tile_pix[:, None]).abs().max())
                cases.append(("sbnet_conv3x3", bl, tile_pix,
                              lambda t=tiles, bl=bl: block_sparse_conv2d(x, w, bias, t, block=bl), err_t))
            for method, tile, mask, fn, e in cases:
                active = float(mask.float().mean())
                cmp = compare(lambda: F.conv2d(x, w, bias, padding=1), fn, repeats=repeats, warmup=3)
                # SBNet computes the halo of every tile too: its FLOPs are (block + 2)² per block² outputs
                flops = dense_flops * active * ((tile + 2) ** 2 / tile ** 2 if method == "sbnet_conv3x3" else 1.0)
                row = SpeedupRow(method=method, batch_size=batch, accuracy=math.nan, mean_flops=flops,
                                 static_flops=dense_flops, theoretical_speedup=dense_flops / flops,
                                 realized_speedup=cmp.speedup,
                                 realized_over_theoretical=cmp.speedup / (dense_flops / flops),
                                 static_ms_per_sample=cmp.baseline_s * 1e3 / batch,
                                 dynamic_ms_per_sample=cmp.candidate_s * 1e3 / batch, timed_samples=batch,
                                 budget=d, unit="density", achieved_budget=active,
                                 extra={"density": active, "channels": channels, "size": size, "stride": 1,
                                        "tile": tile,
                                        "max_abs_error_vs_dense": e})
                rows.append(row)
                name = method if tile == 1 else f"{method} tile {tile}"
                log(f"{name:22s} density {active:.3f}: realized {cmp.speedup:.2f}x (theory {dense_flops / flops:.2f}x)"
                    f", dense {cmp.baseline_s * 1e3:.2f} ms, sparse {cmp.candidate_s * 1e3:.2f} ms")
    meta = {"part": "kernel", "batch": batch, "channels": channels, "size": size, "threads": torch.get_num_threads(),
            "masks": "exact count per sample, random places"}
    for method, tile in [("sparse_conv3x3", 1)] + [("sbnet_conv3x3", bl) for bl in blocks]:
        rs = [r for r in rows if r.method == method and r.extra["tile"] == tile]
        key = f"crossover_density_{method}" + ("" if tile == 1 else f"_tile{tile}")
        meta[key] = crossover_density([r.achieved_budget for r in rs], [r.realized_speedup for r in rs])
    return {"rows": rows, "meta": meta}


def fold_static_resnet(net: torch.nn.Module) -> torch.nn.Module:
    """The static ResNet with every batch norm folded into its convolution (inference), channels-last."""
    from dynaneural.layers import fold_batch_norms
    from dynaneural.spatial_wise.pixel._resnet import fold_conv_bn

    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        for blk in net.blocks:
            for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2")):
                conv, bn = getattr(blk, conv_name), getattr(blk, bn_name)
                wt, b = fold_conv_bn(conv, bn)
                fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=1)
                fused.weight.copy_(wt)
                fused.bias.copy_(b)
                setattr(blk, conv_name, fused)
                setattr(blk, bn_name, torch.nn.Identity())
    return fold_batch_norms(net, inplace=True).to(memory_format=torch.channels_last)  # type: ignore[call-arg]


def _train(model: torch.nn.Module, recipe: Any, data: Any, *, epochs: int, lr: float | None = None) -> None:
    from dynaneural.data import augment_cifar
    from dynaneural.engine import TrainConfig, train

    d = {**recipe.train, "epochs": epochs, "progress": False,
         "warmup_epochs": min(float(recipe.train.get("warmup_epochs", 0.0)), epochs)}
    if lr is not None:
        d["lr"] = lr
    aug = augment_cifar if recipe.dataset == "cifar10" else None
    train(model, train_x=data.train_x, train_y=data.train_y, config=TrainConfig.from_dict(d), augment=aug)
    model.eval()


def layer_skip_state_to_pixel_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``layers.resnet.CifarResNet`` state dict (blocks' ``conv1.0`` / ``conv1.1`` = conv / BN) to the
    pixel-level ResNet's keys (``conv1`` / ``bn1``): the same network, so the layer-skip benches' cached backbone
    can initialise the spatially gated ResNets."""
    out = {}
    for k, v in state.items():
        for i in (1, 2):
            k = k.replace(f".conv{i}.0.", f".conv{i}.").replace(f".conv{i}.1.", f".bn{i}.")
        out[k] = v
    return out


def _pretrained_static(static: torch.nn.Module, recipe: Any, data: Any, backbone_train: dict[str, Any], *,
                       log: Any) -> dict[str, Any]:
    """Load (or train once and cache) the layer-skip benches' backbone ResNet into ``static``; its metadata."""
    from dynaneural.sample_wise.layer_skip.bench import pretrained_backbone

    opts = recipe.options
    arch = dict(opts.get("backbone_arch", {"in_chans": 3, "input_size": 32, "widths": [16, 32, 64],
                                           "blocks_per_stage": 3}))
    net, meta = pretrained_backbone(arch, dict(backbone_train), data, dataset=recipe.dataset,
                                    cache_dir=Path(opts.get("backbone_dir", "runs")), log=log)
    static.load_state_dict(layer_skip_state_to_pixel_resnet(net.state_dict()))
    return meta


# Options that act after training (calibration, evaluation): left out of the fine-tuned pair's cache key, so that
# changing them re-uses the cached training.
_POST_TRAINING_OPTIONS = frozenset({"recalibrate_bn_samples"})


def run_resnet_bench(recipe: Any, *, data_dir: str | None = None, out_dir: str | Path | None = None,
                     log: Any = print) -> dict[str, Any]:
    """Train static → fine-tune DynConv, calibrate, evaluate and time; returns ``{rows, meta}``.

    With ``options.backbone_train`` the static ResNet is not trained here: the layer-skip benches' cached backbone
    (trained once with those settings) initialises both the DynConv model and the static control, which then
    gets the same fine-tuning epochs. With ``out_dir`` the fine-tuned pair is saved there and reused by a re-run
    (which then only calibrates and times).
    """
    from safetensors.torch import load_file, save_file

    from dynaneural.bench.rows import SpeedupRow, time_against_static
    from dynaneural.calibration import calibrate_knob
    from dynaneural.data import load_dataset
    from dynaneural.engine import evaluate, recalibrate_batch_norm
    from dynaneural.registry import create_model

    opts = recipe.options
    finetune = int(opts.get("finetune_epochs", 1))
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    torch.manual_seed(int(recipe.train.get("seed", 0)))
    t0 = time.perf_counter()
    model = create_model(recipe.model, seed=int(recipe.train.get("seed", 0)), **recipe.model_kwargs)
    static = model.to_static()
    backbone_meta: dict[str, Any] = {}
    cache = None
    if out_dir is not None:  # keyed by everything that shapes the fine-tuned pair: a changed recipe retrains
        train_opts = {k: v for k, v in opts.items() if k not in _POST_TRAINING_OPTIONS}
        key = hashlib.sha256(json.dumps({"model": recipe.model, "kwargs": recipe.model_kwargs, "data": recipe.data,
                                         "train": recipe.train, "options": train_opts}, sort_keys=True, default=str
                                        ).encode()).hexdigest()[:12]
        cache = Path(out_dir) / f"{recipe.name}-{key}.safetensors"
    if cache is not None and cache.is_file():
        state = load_file(str(cache))
        model.load_state_dict({k[len("dynamic."):]: v for k, v in state.items() if k.startswith("dynamic.")})
        static.load_state_dict({k[len("static."):]: v for k, v in state.items() if k.startswith("static.")})
        log(f"loaded the fine-tuned model and static control from {cache}")
    else:
        if opts.get("backbone_train"):
            backbone_meta = _pretrained_static(static, recipe, data, opts["backbone_train"], log=log)
        else:
            _train(static, recipe, data, epochs=int(recipe.train.get("epochs", 3)))
            log(f"static pre-training done ({time.perf_counter() - t0:.0f} s)")
        model.load_static(static)
        ft_lr = float(opts.get("finetune_lr", recipe.train.get("lr", 0.05)))
        _train(model, recipe, data, epochs=finetune, lr=ft_lr)
        _train(static, recipe, data, epochs=finetune, lr=ft_lr)  # the static twin gets the same extra epochs
        log(f"fine-tuning done ({time.perf_counter() - t0:.0f} s)")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            state = {**{f"dynamic.{k}": v for k, v in model.state_dict().items()},
                     **{f"static.{k}": v for k, v in static.state_dict().items()}}
            save_file({k: v.contiguous() for k, v in state.items()}, str(cache))
    static.eval()
    static_acc = evaluate(static, data.test_x, data.test_y).accuracy
    static_flops = model.static_total
    val_x = data.val_x[: int(opts.get("calibration_samples", 1000))]

    def mean_fraction(thr: float) -> float:
        prev = model.threshold
        model.threshold = thr
        try:
            return evaluate(model, val_x, data.val_y[: val_x.shape[0]], mode="execute").mean_cost / static_flops
        finally:
            model.threshold = prev

    def set_thr(v: float) -> None:
        model.threshold = v

    static_fast = fold_static_resnet(static)
    x_time = data.test_x[: recipe.bench.timed_samples].contiguous(memory_format=torch.channels_last)
    rows: list[SpeedupRow] = []
    trained_fraction = mean_fraction(model.cfg.threshold)
    log(f"static test accuracy {static_acc:.4f}; DynConv at threshold 0.5: {trained_fraction:.3f} of the FLOPs")
    recal_n = int(opts.get("recalibrate_bn_samples", 0))
    fine_tuned = {k: v.clone() for k, v in model.state_dict().items()}
    for budget in recipe.calibration.budgets:
        model.load_state_dict(fine_tuned)  # each budget re-estimates its own statistics from the fine-tuned state

        def fit_threshold(budget: float = float(budget)) -> Any:
            return calibrate_knob(mean_cost=mean_fraction, set_knob=set_thr, budget=budget, lo=0.0, hi=1.0,
                                  tol=0.01, iters=12, current=model.threshold)
        try:
            cal = fit_threshold()
        except ValueError as e:
            log(f"budget {budget}: not reachable ({e})")
            continue
        recal: dict[str, Any] = {}
        if recal_n:
            # The batch norms were trained under the training masks (Gumbel-noised, or at another threshold):
            # re-estimate them under this budget's hard masks, then re-fit the threshold (the features, hence
            # the masks, moved), twice.
            recal["accuracy_before_bn_recalibration"] = evaluate(model, data.test_x, data.test_y,
                                                                 mode="execute").accuracy
            try:
                for _ in range(2):
                    recalibrate_batch_norm(model, data.train_x[:recal_n],
                                           batch_size=int(recipe.train.get("batch_size", 128)))
                    cal = fit_threshold()
            except ValueError as e:
                log(f"budget {budget}: not reachable after batch-norm recalibration ({e})")
                continue
            recal["bn_recalibration_samples"] = recal_n
        res = evaluate(model, data.test_x, data.test_y, mode="execute")
        for bs in recipe.bench.batch_sizes:
            n = recipe.bench.timed_samples if bs > 1 else recipe.bench.timed_samples_batch1
            t = time_against_static(static_fast, lambda xb: model(xb, mode="execute"), x_time[:n], batch_size=bs,
                                    repeats=recipe.bench.repeats)
            theo = static_flops / res.mean_cost
            rows.append(SpeedupRow(method="dynconv", batch_size=bs, accuracy=res.accuracy, mean_flops=res.mean_cost,
                                   static_flops=static_flops, theoretical_speedup=theo,
                                   realized_over_theoretical=t["realized_speedup"] / theo, budget=float(budget),
                                   achieved_budget=res.mean_cost / static_flops,
                                   budget_error=res.mean_cost / static_flops / float(budget) - 1.0,
                                   static_accuracy=static_acc, **t,
                                   extra={"threshold": cal.knob, "flops_reduction": 1.0 - res.mean_cost / static_flops,
                                          "model": recipe.model, **recal}))
            log(f"budget {budget} batch {bs}: acc {res.accuracy:.4f} (static {static_acc:.4f}), "
                f"{100 * (1 - res.mean_cost / static_flops):.1f}% fewer FLOPs, realized {t['realized_speedup']:.2f}x"
                f" / theory {theo:.2f}x")
    meta = {"part": "resnet", "recipe": recipe.name, "dataset": recipe.dataset, "model": recipe.model,
            "train_samples": int(data.train_x.shape[0]), "static_accuracy": static_acc, "static_flops": static_flops,
            "pretrain_epochs": int(recipe.train.get("epochs", 3)), "finetune_epochs": finetune,
            "backbone": backbone_meta or None,
            "trained_active_fraction_of_flops": trained_fraction, "seconds": time.perf_counter() - t0}
    return {"rows": rows, "meta": meta}


def cmd_bench_spatial(args: argparse.Namespace) -> int:
    from dynaneural.bench.rows import format_rows, write_bench_json
    from dynaneural.cli.main import _maybe_reexec_with_tuned_allocator, _recipe

    _maybe_reexec_with_tuned_allocator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Any] = []
    meta: dict[str, Any] = {}
    if args.part in ("kernel", "all"):
        res = run_kernel_bench(batch=args.batch, channels=args.channels, size=args.size,
                               densities=tuple(args.densities), block=tuple(args.tiles), repeats=args.repeats)
        rows += res["rows"]
        meta["kernel"] = res["meta"]
    if args.part in ("resnet", "all"):
        recipe = _recipe(args)
        res = run_resnet_bench(recipe, data_dir=args.data_dir, out_dir=args.out)
        rows += res["rows"]
        meta["resnet"] = res["meta"]
    print(format_rows(rows))
    print({k: {kk: vv for kk, vv in v.items() if "crossover" in kk} for k, v in meta.items()})
    if args.json:
        path = write_bench_json(args.json, rows, **meta)
        print(f"wrote {path}")
    return 0


def register(bsub: Any, *, common: Any, data_opts: Any) -> None:
    p = bsub.add_parser("spatial", help="pixel-level sparse convolution and the spatially gated ResNet vs dense")
    p.add_argument("--part", default="all", choices=["kernel", "resnet", "all"])
    p.add_argument("--recipe", default="spatial_dynconv_cifar10", help="recipe of the ResNet part")
    p.add_argument("--quick", action="store_true", help="the recipe's quick variant")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's pre-training epochs")
    p.add_argument("--batch", type=int, default=8, help="kernel part: batch size")
    p.add_argument("--channels", type=int, default=64, help="kernel part: channels in = out")
    p.add_argument("--size", type=int, default=56, help="kernel part: map height = width")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75])
    p.add_argument("--repeats", type=int, default=15, help="kernel part: interleaved repeats")
    p.add_argument("--tiles", type=int, nargs="+", default=[8], help="kernel part: SBNet tile sizes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    p.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/spatial_pixel.json)")
    p.add_argument("--out", default=None, help="resnet part: keep the fine-tuned models here; a re-run reuses them")
    data_opts(p)
    common(p)
    p.set_defaults(fn=cmd_bench_spatial)


