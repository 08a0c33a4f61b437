"""The layer-skipping benchmark pipeline behind ``dynaneural bench layer-skip``.

One run, from a recipe (``configs/layer_skip_<method>_<dataset>.yaml``):

1. the backbone ResNet is trained once and cached as a safetensors file under ``runs/`` (keyed by dataset,
   architecture and training settings), so SkipNet, ConvNet-AIG and BlockDrop all start from the same pretrained
   network — BlockDrop needs one anyway, and the gated methods are fine-tuned from it;
2. the method is trained: SkipNet's supervised stage then its hybrid-RL stage, ConvNet-AIG with its target-rate
   loss, BlockDrop's policy by REINFORCE on the frozen ResNet (plus optional joint fine-tuning); the trained model
   is kept under ``<out>/checkpoints/method-<method>-<digest>`` and reloaded by a re-run with the same settings;
3. for every budget the gate threshold is calibrated on the validation split (``calibrate_knob``), the test split
   is evaluated in execute mode (accuracy, mean FLOPs from the cost ledger, blocks executed), and the network is
   timed against its static twin (the same ResNet run fully) at each batch size, interleaved in one run, batch
   norms folded on both sides;
4. a per-class block-usage heat map is written beside the JSON rows.

With ``options.from_scratch: true`` a gated method (ConvNet-AIG, SkipNet) is trained from a random start with
``recipe.train`` instead of fine-tuned from the backbone, as the papers train it; the backbone then serves only as the
static reference, an equally trained one when ``recipe.train`` equals ``options.backbone_train``.

With ``options.static_control: true`` the pretrained ResNet is also trained further *without* gates, with exactly
the method's training settings (``recipe.train``: epochs, learning-rate schedule, augmentation), and every row
reports its accuracy (``static_control_accuracy``): the fair reference when the method's fine-tuning is long
enough to improve the backbone by itself. It is cached like the method.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dynaneural.bench.cache import training_dir
from dynaneural.bench.rows import SpeedupRow, time_against_static
from dynaneural.data import load_dataset
from dynaneural.engine import TrainConfig, evaluate, train
from dynaneural.execution import Mode
from dynaneural.layers import fold_batch_norms
from dynaneural.layers.resnet import CifarResNet, CifarResNetConfig
from dynaneural.recipes import Recipe
from dynaneural.registry import create_model
from dynaneural.sample_wise.layer_skip.base import LayerSkipNetwork, block_usage_by_class, plot_block_usage
from dynaneural.sample_wise.layer_skip.blockdrop import BlockDrop, blockdrop_joint_loss, train_blockdrop_policy
from dynaneural.sample_wise.layer_skip.skipnet import SkipNet, skipnet_hybrid_loss

__all__ = ["METHOD_MODELS", "run_layer_skip_bench", "pretrained_backbone"]

#: the registered model each ``--method`` builds.
METHOD_MODELS = {"skipnet": "skipnet_resnet", "aig": "aig_resnet", "blockdrop": "blockdrop_resnet"}
_ARCH_KEYS = ("in_chans", "input_size", "num_classes", "widths", "blocks_per_stage")


def _ce(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out if isinstance(out, torch.Tensor) else out.logits, y)


def _augment(dataset: str) -> Callable[..., torch.Tensor] | None:
    if dataset == "cifar10":
        from dynaneural.data.transforms import augment_cifar

        return augment_cifar
    return None


def pretrained_backbone(arch: dict[str, Any], train_cfg: dict[str, Any], data: Any, *, dataset: str,
                        cache_dir: Path, log: Callable[[str], None] = print) -> tuple[CifarResNet, dict[str, Any]]:
    """Train (or load from ``cache_dir``) the backbone ResNet; returns it and its metadata (test accuracy, time)."""
    arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in arch.items()}
    key = hashlib.sha256(json.dumps({"dataset": dataset, "arch": arch, "train": train_cfg,
                                     "n": int(data.train_x.shape[0])}, sort_keys=True, default=str).encode()
                         ).hexdigest()[:12]
    path = cache_dir / f"layer-skip-backbone-{dataset}-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    net = CifarResNet(CifarResNetConfig(**arch))
    if path.is_file() and meta_path.is_file():
        net.load_state_dict(load_file(str(path)))
        meta = json.loads(meta_path.read_text())
        log(f"backbone: loaded {path} (test accuracy {meta['test_accuracy']:.4f})")
        return net.eval(), meta
    t0 = time.perf_counter()
    # Checkpointed every epoch beside the cache, so an interrupted run resumes instead of starting over.
    cfg = TrainConfig.from_dict({**train_cfg, "progress": False, "checkpoint_dir": cache_dir / f"{path.stem}-train"})
    log(f"backbone: training ResNet-{net.config.depth} {arch} for {cfg.epochs} epoch(s) on "
        f"{data.train_x.shape[0]} images")
    train(net, train_x=data.train_x, train_y=data.train_y, config=cfg, augment=_augment(dataset), loss_fn=_ce)
    seconds = time.perf_counter() - t0
    acc = evaluate(net, data.test_x, data.test_y).accuracy
    meta = {"test_accuracy": acc, "train_seconds": seconds, "arch": {k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in arch.items()},
            "train": train_cfg, "checkpoint": str(path)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    log(f"backbone: test accuracy {acc:.4f} after {seconds:.0f} s → {path}")
    return net.eval(), meta


def _train_method(model: LayerSkipNetwork, method: str, recipe: Recipe, data: Any, options: dict[str, Any],
                  log: Callable[[str], None], checkpoints: Path | None = None) -> dict[str, float]:
    """Train the decision machinery (and fine-tune the ResNet where the method does); returns seconds per stage.

    With ``checkpoints`` every stage that runs the training loop checkpoints under ``checkpoints/<stage>`` each epoch,
    so an interrupted run resumes there (a long from-scratch training spans sessions)."""
    seconds: dict[str, float] = {}

    def ckpt(stage: str) -> dict[str, Any]:
        return {"checkpoint_dir": checkpoints / stage} if checkpoints is not None else {}

    aug = _augment(recipe.dataset)
    limit = options.get("method_train_limit")
    if limit:  # the method may train on fewer images than the backbone did (the first ones: a stratified order)
        from types import SimpleNamespace

        data = SimpleNamespace(train_x=data.train_x[:int(limit)], train_y=data.train_y[:int(limit)])
    base_cfg = {**recipe.train, "progress": False}
    if method == "blockdrop":
        assert isinstance(model, BlockDrop)
        pol = dict(options.get("policy", {}))
        t0 = time.perf_counter()
        n = int(pol.pop("train_limit", data.train_x.shape[0]))
        train_blockdrop_policy(model, data.train_x[:n], data.train_y[:n], log=log, **pol)
        seconds["policy"] = time.perf_counter() - t0
        joint = int(options.get("joint_epochs", 0))
        if joint:
            seconds["joint"] = _seconds(train(
                model, train_x=data.train_x, train_y=data.train_y, augment=aug, loss_fn=blockdrop_joint_loss(model),
                config=TrainConfig.from_dict({**base_cfg, "epochs": joint, **ckpt("joint")})))
        return seconds
    if method == "skipnet":
        assert isinstance(model, SkipNet)
        model.phase = "supervised"
    stage = "supervised" if method == "skipnet" else "train"
    seconds[stage] = _seconds(train(model, train_x=data.train_x, train_y=data.train_y, augment=aug, loss_fn=_ce,
                                    config=TrainConfig.from_dict({**base_cfg, **ckpt(stage)})))
    if method == "skipnet":
        assert isinstance(model, SkipNet)
        rl = dict(options.get("rl", {}))
        epochs = int(rl.pop("epochs", 1))
        if epochs:
            cost_weight = float(rl.pop("cost_weight", 0.5))
            model.phase = "rl"
            model.exploration = float(rl.pop("exploration", model.exploration))
            seconds["rl"] = _seconds(train(
                model, train_x=data.train_x, train_y=data.train_y, augment=aug,
                loss_fn=skipnet_hybrid_loss(model, cost_weight=cost_weight),
                config=TrainConfig.from_dict({**base_cfg, "epochs": epochs, **rl, **ckpt("rl")})))
    return seconds


def _seconds(result: Any) -> float:
    """Training time of every epoch, those before a resume included (each epoch's time is in the history)."""
    return float(sum(e["seconds"] for e in result.history))


def _train_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine what training learns (not where it runs or how it reports)."""
    return {k: v for k, v in cfg.items() if k not in ("num_threads", "progress", "device", "checkpoint_dir")}


def _load_or_train(net: torch.nn.Module, cache: Path, train_fn: Callable[[], Any], *, recipe: str
                   ) -> tuple[Any, bool]:
    """Load ``net`` from ``cache`` (``model.safetensors`` + ``train.json``) or run ``train_fn()`` and save it there;
    returns what ``train_fn`` returned (the stored copy when loaded) and whether it was loaded."""
    weights, info = cache / "model.safetensors", cache / "train.json"
    if weights.is_file() and info.is_file():
        net.load_state_dict(load_file(str(weights)))
        return json.loads(info.read_text())["seconds"], True
    seconds = train_fn()
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    info.write_text(json.dumps({"seconds": seconds, "recipe": recipe}, indent=2))
    return seconds, False


def static_control(backbone: CifarResNet, recipe: Recipe, data: Any, *, cache: Path,
                   log: Callable[[str], None] = print) -> tuple[float, float]:
    """Train a copy of ``backbone`` with the method's own training settings, gates absent; returns (test accuracy,
    seconds). Cached under ``cache``."""
    net = CifarResNet(backbone.config)
    net.load_state_dict(backbone.state_dict())

    def fit() -> float:
        torch.manual_seed(int(recipe.train.get("seed", 0)))
        t0 = time.perf_counter()
        train(net, train_x=data.train_x, train_y=data.train_y, augment=_augment(recipe.dataset), loss_fn=_ce,
              config=TrainConfig.from_dict({**recipe.train, "progress": False}))
        return time.perf_counter() - t0

    seconds, loaded = _load_or_train(net, cache, fit, recipe=recipe.name)
    if loaded:
        log(f"static control: loaded {cache}")
    acc = evaluate(net.eval(), data.test_x, data.test_y).accuracy
    log(f"static control (the ResNet trained on with the method's settings, no gates): test accuracy {acc:.4f} "
        f"({float(seconds):.0f} s)")
    return acc, float(seconds)


def run_layer_skip_bench(recipe: Recipe, *, method: str, out_dir: str | Path, data_dir: str | None = None,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark described by ``recipe`` for ``method``; returns ``{"rows": [SpeedupRow...], ...}``."""
    if method not in METHOD_MODELS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHOD_MODELS)}")
    if recipe.model != METHOD_MODELS[method]:
        raise ValueError(f"recipe {recipe.name} builds {recipe.model}, not {METHOD_MODELS[method]} ({method})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = dict(recipe.options)
    threads = opts.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    data = load_dataset(recipe.dataset, data_dir=data_dir, **recipe.data)
    arch = {k: recipe.model_kwargs[k] for k in _ARCH_KEYS if k in recipe.model_kwargs}
    backbone, bmeta = pretrained_backbone(arch, dict(opts.get("backbone_train", {})), data, dataset=recipe.dataset,
                                          cache_dir=Path(opts.get("backbone_dir", "runs")), log=log)
    from_scratch = bool(opts.get("from_scratch", False))
    if from_scratch:
        # The gates and the ResNet learn together from a random start, as the AIG and SkipNet papers train them;
        # the cached backbone is then only the static reference, and a fair one when trained the same way.
        if method == "blockdrop":
            raise ValueError("BlockDrop's policy picks the blocks of a pretrained ResNet: options.from_scratch "
                             "does not apply to it")
        if _train_settings(recipe.train) != _train_settings(opts.get("backbone_train", {})):
            log(f"{method}: warning: trained from scratch with settings other than the backbone's, so the static "
                "reference is not equally trained")
        model = create_model(recipe.model, seed=int(recipe.train.get("seed", 0)), **recipe.model_kwargs)
    else:
        model = create_model(recipe.model, **recipe.model_kwargs)
        model.backbone.load_state_dict(backbone.state_dict())
    assert isinstance(model, LayerSkipNetwork)
    # The trained method is kept beside the results (keyed by everything that determines it), so re-timing after
    # a change to an execute path costs no training; change a setting and the key changes.
    cache = training_dir(out, f"method-{method}", recipe.model, recipe.model_kwargs, recipe.train, recipe.data,
                         {k: v for k, v in opts.items() if k not in ("threads", "calibration_samples",
                                                                     "calibration_iters", "calibration_tol")},
                         bmeta.get("checkpoint"), int(data.train_x.shape[0]),
                         # what the training objective depends on beyond the recipe: a change there retrains
                         {"budget_on_decisions": model.budget_on_decisions, "objective_version": 2})
    assert cache is not None

    def fit() -> dict[str, float]:
        torch.manual_seed(int(recipe.train.get("seed", 0)))
        return _train_method(model, method, recipe, data, opts, log, checkpoints=cache / "resume")

    seconds, loaded = _load_or_train(model, cache, fit, recipe=recipe.name)
    if loaded:
        log(f"{method}: loaded the trained model from {cache}")
    model.eval()
    all_on_acc = _accuracy(model, data.test_x, data.test_y, all_on=True)
    log(f"{method}: trained ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); "
        f"all blocks on: test accuracy {all_on_acc:.4f} (pretrained {bmeta['test_accuracy']:.4f})")
    control_acc, control_seconds = float("nan"), None
    if opts.get("static_control"):
        control_acc, control_seconds = static_control(
            backbone, recipe, data, log=log,
            cache=training_dir(out, "static-control", arch, recipe.train, recipe.data, bmeta.get("checkpoint"),
                               int(data.train_x.shape[0])) or out)

    n_cal = int(opts.get("calibration_samples", data.val_x.shape[0]))
    cal_x = data.val_x[:n_cal]
    costs = model.costs()
    rows: list[SpeedupRow] = []
    for budget in recipe.calibration.budgets:
        try:
            cal = model.calibrate(cal_x, budget=float(budget), tol=float(opts.get("calibration_tol", 5e-3)),
                                  iters=int(opts.get("calibration_iters", 20)))
        except ValueError as e:
            log(f"{method}: budget {budget}: {e}")
            continue
        res = evaluate(model, data.test_x, data.test_y, mode=Mode.EXECUTE)
        usage = block_usage_by_class(model, data.test_x, data.test_y)
        counts = torch.bincount(data.test_y.long(), minlength=model.num_classes).float()
        block_frac = (usage.nan_to_num(0) * counts.unsqueeze(1)).sum(0) / counts.sum()  # (L,) over the test set
        gated = list(model.gate_blocks)
        plot = plot_block_usage(usage, str(out / f"block_usage_{method}_{budget:g}.png"),
                                class_names=list(getattr(data, "classes", None) or []) or None,
                                title=f"{method}: fraction of each class running each block (budget {budget:g})")
        static = fold_batch_norms(model.to_static()).eval()
        dyn = fold_batch_norms(model).eval()
        mean_flops = float(res.mean_cost or 0.0)
        for bs in recipe.bench.batch_sizes:
            n_time = recipe.bench.timed_samples_batch1 if bs == 1 else recipe.bench.timed_samples
            timing = time_against_static(static, lambda xb, m=dyn: m(xb, mode=Mode.EXECUTE), data.test_x[:n_time],
                                         batch_size=int(bs), repeats=recipe.bench.repeats)
            theory = costs.static_total / mean_flops
            # What the public reference implementations do: compute every block for every sample and mask
            # (our simulate mode). Timed the same way, for the comparison the issue asks for.
            masked = time_against_static(static, lambda xb, m=dyn: m(xb, mode=Mode.SIMULATE),
                                         data.test_x[:n_time], batch_size=int(bs), repeats=recipe.bench.repeats)
            row = SpeedupRow(
                method=method, batch_size=int(bs), accuracy=res.accuracy, mean_flops=mean_flops,
                static_flops=costs.static_total, theoretical_speedup=theory,
                realized_speedup=timing["realized_speedup"],
                realized_over_theoretical=timing["realized_speedup"] / theory,
                static_ms_per_sample=timing["static_ms_per_sample"],
                dynamic_ms_per_sample=timing["dynamic_ms_per_sample"], timed_samples=timing["timed_samples"],
                budget=float(budget), unit="fraction", achieved_budget=mean_flops / costs.static_total,
                budget_error=mean_flops / costs.static_total / float(budget) - 1.0,
                static_accuracy=float(bmeta["test_accuracy"]),
                extra={"dataset": recipe.dataset, "model": recipe.model, "recipe": recipe.name,
                       "blocks_executed_fraction": float(block_frac.mean()),
                       "gated_blocks_executed_fraction": float(block_frac[gated].mean()),
                       "blocks_executed_per_block": [round(float(v), 4) for v in block_frac],
                       "gate_threshold": cal.knob, "calibrated_val_fraction": cal.mean_cost,
                       "decision_flops_fraction": (costs.policy + sum(costs.gates)) / costs.static_total,
                       "all_on_accuracy": all_on_acc, "pretrained_accuracy": bmeta["test_accuracy"],
                       "backbone_arch": bmeta["arch"], "backbone_train_seconds": bmeta.get("train_seconds"),
                       "method_train_seconds": seconds, "block_usage_plot": plot,
                       "masked_reference_speedup": masked["realized_speedup"],
                       "static_control_accuracy": control_acc, "static_control_train_seconds": control_seconds,
                       "from_scratch": from_scratch})
            rows.append(row)
            log(f"{method}: budget {budget:g} batch {bs}: accuracy {res.accuracy:.4f} (pretrained "
                f"{bmeta['test_accuracy']:.4f}), FLOPs {mean_flops / 1e6:.3f}M of {costs.static_total / 1e6:.3f}M, "
                f"theory {theory:.3f}x, realized {timing['realized_speedup']:.3f}x "
                f"(ratio {timing['realized_speedup'] / theory:.3f}); compute-all-and-mask "
                f"{masked['realized_speedup']:.3f}x")
    return {"rows": rows, "backbone": bmeta, "method": method, "recipe": recipe.name}


def _accuracy(model: LayerSkipNetwork, x: torch.Tensor, y: torch.Tensor, *, all_on: bool) -> float:
    if all_on:
        with model.all_on():
            return evaluate(model, x, y, mode=Mode.EXECUTE).accuracy
    return evaluate(model, x, y, mode=Mode.EXECUTE).accuracy
