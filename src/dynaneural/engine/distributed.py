"""Data-parallel (DDP) training of any DynaNeural model, with expert parallelism for mixture-of-experts layers.

Launch with torchrun (gloo on CPU, NCCL on GPUs)::

    torchrun --standalone --nproc_per_node=2 -m dynaneural.engine.distributed \\
        --model moe_mlp_digits --dataset digits --epochs 3 --batch-size 64 --expert-parallel --out runs/ddp

Every rank builds the same model from the same seed; :func:`wrap_ddp` wraps it in
``torch.nn.parallel.DistributedDataParallel``, which broadcasts rank 0's weights and averages the gradients of the
dense parameters. With ``--expert-parallel`` the MoE layers are first sharded
(:func:`dynaneural.sample_wise.moe.distributed.shard_experts`): DDP ignores the expert weights, whose tokens
travel by all-to-all.

Sharding of the data (:func:`train_distributed`): every rank draws the same permutation of the training set each
epoch (the run's seeded generator, as in ``engine.trainer.train``), cuts it into global batches of
``config.batch_size`` and takes its contiguous ``1/W`` piece of each — the DistributedSampler split, done per
global batch, so a step on W ranks sees exactly the samples of the same step on one process. The task loss of a
rank is scaled by ``W · n_rank / n_batch`` so that DDP's gradient average is the gradient of the global batch
mean even for an uneven last batch. Training on W ranks thus follows the 1-process trajectory up to float
summation order (tested).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dynaneural.contract import set_train_progress
from dynaneural.engine.checkpoint import save_model
from dynaneural.engine.trainer import TrainConfig, WarmupCosine, _check_data, _make_optimizer
from dynaneural.execution import Mode

__all__ = ["init_distributed", "wrap_ddp", "train_distributed", "evaluate_distributed", "main"]


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (no-op if done or not under torchrun).

    Returns:
        (rank, world_size); (0, 1) outside a distributed launch.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(model: nn.Module, *, find_unused_parameters: bool = False, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` with the expert-parallel (sharded) parameters excluded.

    Returns ``model`` itself when torch.distributed is not initialised. ``find_unused_parameters`` is needed
    for models that skip parameterised blocks in train mode.
    """
    if not dist.is_initialized():
        return model
    from dynaneural.sample_wise.moe.distributed import expert_parameter_names

    ignore = expert_parameter_names(model)
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    if not any(p.requires_grad for n, p in model.named_parameters() if n not in ignore):
        return model  # nothing to synchronise
    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters, **ddp_kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.inference_mode()
def evaluate_distributed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512,
                         mode: Mode | str = Mode.EXECUTE) -> dict[str, float]:
    """Accuracy and mean cost over ``(x, y)``, every rank evaluating the same-sized share of each batch.

    All ranks take part in every forward (needed by expert-parallel layers), even with an empty share.
    """
    rank, world = _world()
    m = _unwrap(model)
    was = m.training
    m.eval()
    correct = cost = seen = 0.0
    try:
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s:s + batch_size].tensor_split(world)[rank], y[s:s + batch_size].tensor_split(world)[rank]
            if xb.shape[0] == 0:  # keep the collectives in step: run one duplicated sample and count nothing
                out = m(x[s:s + 1], mode=mode)
                continue
            out = m(xb, mode=mode)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            correct += float((logits.argmax(-1) == yb).sum())
            seen += xb.shape[0]
            c = getattr(out, "cost", None)
            cost += float(c.sum()) if c is not None else 0.0
    finally:
        m.train(was)
    correct, cost, seen = _all_sum([correct, cost, seen])
    return {"accuracy": correct / seen, "mean_cost": cost / seen, "num_samples": int(seen)}


def train_distributed(model: nn.Module, *, train_x: torch.Tensor, train_y: torch.Tensor,
                      val_x: torch.Tensor | None = None, val_y: torch.Tensor | None = None, config: TrainConfig,
                      loss_fn: Callable[[Any, torch.Tensor], Any] | None = None,
                      augment: Callable[..., torch.Tensor] | None = None, find_unused_parameters: bool = False,
                      ) -> dict[str, Any]:
    """Train ``model`` in place with DDP over the current process group (see the module docstring).

    Uses ``config``'s optimizer, learning-rate schedule, gradient clipping, seed, ``max_steps`` and
    ``checkpoint_dir`` (rank 0 writes ``last.safetensors`` at the end — every rank its own
    ``rank{r}.safetensors`` when experts are sharded). ``config.batch_size`` is the *global* batch.
    Without a process group it runs the same loop on one process.

    Returns:
        ``{"history": [per-epoch dicts], "steps": int, "world_size": int, "checkpoint": path or None}``.
    """
    from dynaneural.sample_wise.moe.distributed import expert_parameter_names

    cfg = config
    _check_data(train_x, train_y, "train_x", "train_y")
    rank, world = _world()
    device = torch.device(cfg.device)
    if device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    n = train_x.shape[0]
    bs = cfg.batch_size
    spe = n // bs if cfg.drop_last else math.ceil(n / bs)
    if spe == 0:
        raise ValueError(f"drop_last with batch_size {bs} leaves no batch from {n} training samples")
    if bs < world:
        raise ValueError(f"the global batch_size {bs} is smaller than the {world} ranks")
    torch.manual_seed(cfg.seed)
    model.to(device)
    ddp = wrap_ddp(model, find_unused_parameters=find_unused_parameters)
    loss_fn = loss_fn if loss_fn is not None else cfg.loss()
    optimizer = _make_optimizer(model, cfg)
    total = cfg.epochs * spe
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(
        warmup=round(cfg.warmup_epochs * spe), total=total, min_ratio=cfg.min_lr_ratio,
        cosine=cfg.schedule == "cosine"))
    order_gen = torch.Generator().manual_seed(2 * cfg.seed)
    aug_gen = torch.Generator().manual_seed(2 * cfg.seed + 1 + 7919 * rank)
    prev_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    history: list[dict[str, Any]] = []
    step = 0
    try:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=order_gen)
            model.train()
            t0 = time.perf_counter()
            loss_sum = seen = 0.0
            for b in range(spe):
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                gidx = perm[b * bs:(b + 1) * bs]
                idx = gidx.tensor_split(world)[rank]
                xb, yb = train_x[idx].to(device), train_y[idx].to(device)
                if augment is not None:
                    xb = augment(xb, generator=aug_gen)
                set_train_progress(model, step / max(total, 1))
                out = ddp(xb)
                parts = loss_fn(out, yb)
                task = parts if isinstance(parts, torch.Tensor) else parts["loss"]
                loss = task * (world * idx.numel() / gidx.numel())
                for v in (getattr(out, "aux_losses", None) or {}).values():
                    loss = loss + v
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"the training loss is {value} at step {step} on rank {rank}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += value * idx.numel()
                seen += idx.numel()
            loss_sum, seen = _all_sum([loss_sum, seen])
            entry: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": float(optimizer.param_groups[0]["lr"]),
                                     "seconds": round(time.perf_counter() - t0, 4),
                                     "train_loss": loss_sum / max(seen, 1.0)}
            if val_x is not None and val_y is not None:
                entry["val_acc"] = evaluate_distributed(model, val_x, val_y, batch_size=cfg.eval_batch_size,
                                                        mode=Mode.EXECUTE)["accuracy"]
            history.append(entry)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    finally:
        torch.set_num_threads(prev_threads)
    ckpt = None
    if cfg.checkpoint_dir is not None:
        sharded = bool(expert_parameter_names(model)) and world > 1
        if sharded or rank == 0:
            name = f"rank{rank}.safetensors" if sharded else "last.safetensors"
            ckpt = save_model(model, Path(cfg.checkpoint_dir) / name,
                              extras={"train": {"config": cfg.to_dict(), "history": history, "world_size": world}})
        if dist.is_initialized():
            dist.barrier()
    return {"history": history, "steps": step, "world_size": world, "checkpoint": str(ckpt) if ckpt else None}


# ------------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynaneural.engine.distributed",
                                description="DDP (and expert-parallel) training; launch with torchrun")
    p.add_argument("--recipe", default=None, help="recipe name or YAML path (model, dataset, train settings)")
    p.add_argument("--model", default=None, help="registered model (overrides the recipe's)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of model arguments")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"])
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--expert-parallel", action="store_true", help="shard the MoE experts over the ranks")
    p.add_argument("--find-unused-parameters", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default=None, help="checkpoints and metrics.json go here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dynaneural.data import load_dataset
    from dynaneural.recipes import load_recipe
    from dynaneural.registry import create_model

    recipe = load_recipe(args.recipe) if args.recipe else None
    model_name = args.model or (recipe.model if recipe else None)
    dataset = args.dataset or (recipe.dataset if recipe else None)
    if model_name is None or dataset is None:
        raise SystemExit("give --recipe, or --model and --dataset")
    kwargs = {**(recipe.model_kwargs if recipe and not args.model else {}), **json.loads(args.model_kwargs)}
    train_opts: dict[str, Any] = dict(recipe.train) if recipe else {}
    for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                       ("optimizer", args.optimizer), ("max_steps", args.max_steps)):
        if value is not None:
            train_opts[key] = value
    train_opts.update(progress=False, num_threads=args.threads)
    if args.out:
        train_opts["checkpoint_dir"] = Path(args.out)
    cfg = TrainConfig.from_dict(train_opts)

    torch.set_num_threads(args.threads)
    rank, world = init_distributed()
    try:
        data = load_dataset(dataset, data_dir=args.data_dir, **(recipe.data if recipe else {}))
        tx, ty = data.train_x, data.train_y
        if args.limit:
            tx, ty = tx[:args.limit], ty[:args.limit]
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = create_model(model_name, **kwargs)
        if args.expert_parallel and world > 1:  # one process holds every expert: nothing to shard
            from dynaneural.sample_wise.moe.distributed import shard_experts

            shard_experts(model)
        res = train_distributed(model, train_x=tx, train_y=ty, val_x=data.val_x, val_y=data.val_y, config=cfg,
                                find_unused_parameters=args.find_unused_parameters)
        test = evaluate_distributed(model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size)
        summary = {"model": model_name, "dataset": dataset, "world_size": world, "expert_parallel":
                   args.expert_parallel, "test": test, **res}
        if rank == 0:
            print(json.dumps(summary, indent=2))
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "metrics.json").write_text(json.dumps(summary, indent=2))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
