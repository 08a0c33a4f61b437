"""Training and evaluation loops for dynamic (multi-exit) and plain classifiers on in-memory tensors.

``train`` is deterministic given ``TrainConfig.seed``: the global torch RNG is seeded once at the start of a fresh
run, the data order and the augmentation draw from two private ``torch.Generator`` objects, and a resumed run
restores all three from the checkpoint. Training N epochs in one go or in several interrupted pieces gives the
same weights, bit for bit, on the same device and thread count.

Checkpoints go to ``<checkpoint_dir>/last.safetensors`` (see :mod:`dynaneural.engine.checkpoint`): the weights,
plus a :class:`~dynaneural.engine.checkpoint.TrainingState` — optimizer, LR scheduler, epoch/step, RNG states, the
history, and, when the run was cut by ``max_steps``, the position inside the current epoch — all in one file
written atomically. The file is also a plain model checkpoint for :func:`~dynaneural.engine.checkpoint.load_model`.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from dynaneural.contract import set_train_progress
from dynaneural.engine.checkpoint import (
    CheckpointError,
    TrainingState,
    load_training_state,
    load_weights,
    save_model,
)
from dynaneural.execution import Mode
from dynaneural.objectives.multi_exit import MultiExitLoss

__all__ = ["TrainConfig", "TrainResult", "EvalResult", "WarmupCosine", "train", "evaluate", "default_device",
           "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.safetensors"

LossFn = Callable[[Any, torch.Tensor], "Mapping[str, torch.Tensor] | torch.Tensor"]
Augment = Callable[..., torch.Tensor]

# Fields that may change between an interrupted run and its resumption; all others shape the trajectory.
_RESUMABLE_CHANGES = frozenset({"progress", "checkpoint_dir", "checkpoint_every", "max_steps", "eval_batch_size",
                                "num_threads", "device"})


def default_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(kw_only=True)
class TrainConfig:
    """How to train a model; validated on construction.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per optimizer step.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay, applied to every parameter.
        optimizer: ``"sgd"`` (with ``momentum``/``nesterov``) or ``"adamw"``.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        schedule: ``"cosine"`` (anneal to ``min_lr_ratio · lr`` by the last step of ``epochs``) or ``"constant"``.
        warmup_epochs: linear warm-up from 0 to ``lr`` over this many epochs (may be fractional).
        min_lr_ratio: final learning rate of the cosine schedule, as a fraction of ``lr``.
        exit_weights: ``MultiExitLoss`` weights: ``"uniform"``, ``"linear"`` or one number per exit.
        normalise_exit_weights: ``MultiExitLoss.normalise``: scale the exit weights to sum to one (default) or sum
            the exits' losses as weighted (slimmable networks' objective).
        distill_alpha: ``MultiExitLoss`` self-distillation share α (0 = off).
        distill_temperature: ``MultiExitLoss`` distillation temperature T.
        policy_weight: ``MultiExitLoss`` weight of the exit-policy BCE (models with learned exit policies).
        label_smoothing: label smoothing of the cross-entropy terms.
        grad_clip: clip the global gradient norm to this value (None = no clipping).
        drop_last: skip the last incomplete batch of every epoch.
        seed: seeds the global torch RNG (fresh runs), the data order and the augmentation.
        checkpoint_dir: where ``last.safetensors`` is written (None = no checkpoints, no resuming).
        checkpoint_every: write a checkpoint every this many epochs (and always at the end).
        progress: show a tqdm progress bar (only when stderr is a terminal).
        max_steps: stop after this many optimizer steps in all, for quick runs. The schedule still spans
            ``epochs``, so a cut run is an exact prefix of the full one and can be resumed.
        eval_batch_size: batch size of the per-epoch validation.
        num_threads: torch CPU threads during training (None = leave as is).
        channels_last: train image models in channels-last memory format (1.2–1.5× faster convolutions with
            oneDNN on CPU); the model is returned in the default format.
        device: where to train (default: ``"cuda"`` if available, else ``"cpu"``).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    exit_weights: str | tuple[float, ...] = "uniform"
    normalise_exit_weights: bool = True
    distill_alpha: float = 0.0
    distill_temperature: float = 3.0
    policy_weight: float = 1.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    drop_last: bool = False
    seed: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 1
    progress: bool = True
    max_steps: int | None = None
    eval_batch_size: int = 512
    num_threads: int | None = None
    channels_last: bool = False
    device: str = field(default_factory=default_device)

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, *, optional: bool = False) -> None:
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def non_negative(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("checkpoint_every", self.checkpoint_every)
        positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("max_steps", self.max_steps, optional=True)
        positive_int("num_threads", self.num_threads, optional=True)
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "min_lr_ratio"):
            non_negative(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs})")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer='sgd' with momentum > 0")
        if self.grad_clip is not None:
            non_negative("grad_clip", self.grad_clip)
            if self.grad_clip == 0:
                raise ValueError("grad_clip must be positive (or None for no clipping)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.exit_weights, str):
            self.exit_weights = tuple(float(w) for w in self.exit_weights)
        self.loss()  # validates the loss options with MultiExitLoss's own checks
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {self.device!r} is not a valid torch device: {e}") from None

    def loss(self) -> MultiExitLoss:
        """The training objective these options describe."""
        return MultiExitLoss(weights=self.exit_weights, distill_alpha=self.distill_alpha,
                             distill_temperature=self.distill_temperature, policy_weight=self.policy_weight,
                             label_smoothing=self.label_smoothing, normalise=self.normalise_exit_weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings, tuples as lists)."""
        d = asdict(self)
        d["checkpoint_dir"] = str(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if not isinstance(self.exit_weights, str):
            d["exit_weights"] = list(self.exit_weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a YAML recipe); unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        history: one dict per completed epoch: ``epoch``, ``step``, ``lr`` (after the epoch's last step),
            ``seconds``, ``train_loss``,
            ``train/<loss part>`` means, ``train_acc/exit{k}``, and with validation data ``val_acc`` (final
            exit) and ``val_acc/exit{k}``.
        checkpoint: the last checkpoint written (None without ``checkpoint_dir``).
        epochs_completed: full epochs done, counting those before a resume.
        steps: optimizer steps done, counting those before a resume.
        resumed_from: the checkpoint this call resumed from, if any.
    """

    history: list[dict[str, Any]]
    checkpoint: Path | None
    epochs_completed: int
    steps: int
    resumed_from: Path | None = None


@dataclass
class EvalResult:
    """What ``evaluate`` returns.

    Attributes:
        mode: the mode the model ran in.
        num_samples: samples evaluated.
        accuracy: accuracy of the model's prediction (``logits``: the final exit in train mode, each sample's
            chosen exit in simulate/execute mode).
        exit_accuracy: accuracy of every exit (multi-exit models in train/simulate mode).
        mean_cost: mean FLOPs per sample (models that report a cost).
        exit_fraction: fraction of samples leaving at each exit (multi-exit models in simulate/execute mode).
    """

    mode: str
    num_samples: int
    accuracy: float
    exit_accuracy: list[float] | None = None
    mean_cost: float | None = None
    exit_fraction: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512,
             mode: Mode | str = Mode.SIMULATE, device: str | torch.device | None = None) -> EvalResult:
    """Accuracy of ``model`` on ``(x, y)``, per exit where it has exits, in inference mode.

    Args:
        model: a multi-exit model (forward takes ``mode=``) or a plain classifier returning logits (or an
            output with ``logits``); ``mode`` is ignored for the latter.
        x: (N, ...) inputs.
        y: (N,) integer labels.
        batch_size: samples per forward pass.
        mode: ``train`` (every exit for every sample: per-exit accuracy), ``simulate`` (per-exit accuracy plus
            the calibrated early-exit prediction and its cost) or ``execute`` (the early-exit prediction and its
            cost, really skipping work).
        device: where to run (default: the device of the model's parameters).
    """
    mode = Mode.parse(mode)
    _check_data(x, y, "x", "y")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    takes_mode = _accepts_mode(model)
    was_training = model.training
    model.eval()
    n = x.shape[0]
    correct = torch.zeros((), dtype=torch.long, device=device)
    exit_correct: torch.Tensor | None = None
    exit_counts: torch.Tensor | None = None
    cost_sum: torch.Tensor | None = None
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                xb = x[start:start + batch_size].to(device, non_blocking=True)
                yb = y[start:start + batch_size].to(device, non_blocking=True).long()
                out = model(xb, mode=mode) if takes_mode else model(xb)
                logits = out if isinstance(out, torch.Tensor) else out.logits
                correct += (logits.argmax(-1) == yb).sum()
                exits = getattr(out, "exit_logits", None)
                if exits is not None and mode is not Mode.EXECUTE:
                    c = torch.stack([(z.argmax(-1) == yb).sum() for z in exits])
                    exit_correct = c if exit_correct is None else exit_correct + c
                cost = getattr(out, "cost", None)
                if cost is not None:
                    s = cost.double().sum()
                    cost_sum = s if cost_sum is None else cost_sum + s
                decisions = getattr(out, "decisions", None)
                k_exits = len(exits) if exits is not None else getattr(model, "num_exits", None)
                if mode is not Mode.TRAIN and decisions and "exit" in decisions and k_exits:
                    counts = torch.bincount(decisions["exit"].long(), minlength=int(k_exits))
                    exit_counts = counts if exit_counts is None else exit_counts + counts
    finally:
        model.train(was_training)
    return EvalResult(
        mode=mode.value, num_samples=n, accuracy=float(correct) / n,
        exit_accuracy=[float(c) / n for c in exit_correct] if exit_correct is not None else None,
        mean_cost=float(cost_sum) / n if cost_sum is not None else None,
        exit_fraction=[float(c) / n for c in exit_counts] if exit_counts is not None else None,
    )


# --------------------------------------------------------------------------------------------------- training
class WarmupCosine:
    """LR factor at step ``s``: linear warm-up over ``warmup`` steps, then a cosine from 1 to ``min_ratio`` at
    step ``total`` (or constant 1 when ``cosine`` is false). A plain object, so ``LambdaLR`` saves its state."""

    def __init__(self, *, warmup: int, total: int, min_ratio: float, cosine: bool) -> None:
        self.warmup = int(warmup)
        self.total = int(total)
        self.min_ratio = float(min_ratio)
        self.cosine = bool(cosine)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model: nn.Module, *, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None = None,
          val_y: torch.Tensor | None = None, config: TrainConfig, augment: Augment | None = None,
          loss_fn: LossFn | None = None, resume: bool = True) -> TrainResult:
    """Train ``model`` in place on in-memory tensors.

    Args:
        model: a multi-exit model (train-mode output with ``exit_logits``) or a plain classifier (a tensor of
            logits, or an output with ``logits``). It is moved to ``config.device``.
        train_x: (N, ...) training inputs (any device; batches are moved to ``config.device``).
        train_y: (N,) integer labels.
        val_x: validation inputs, evaluated after every epoch (train mode: accuracy of every exit).
        val_y: validation labels.
        config: the run's settings.
        augment: called as ``augment(xb, generator=g)`` on every training batch (on the device), ``g`` a CPU
            ``torch.Generator`` owned by the run; ``dynaneural.data.augment_cifar`` fits.
        loss_fn: ``loss_fn(output, labels)`` returning a dict with ``loss`` (or a tensor); default
            ``config.loss()``. Auxiliary losses in ``output.aux_losses`` are added to it.
        resume: continue from ``<checkpoint_dir>/last.safetensors`` when it exists (the config must match the
            one that wrote it, except for the fields that do not change the trajectory — device, max_steps,
            progress, checkpointing, threads).

    Returns:
        The history and the last checkpoint.

    Raises:
        ValueError: bad data, or a resume from a checkpoint written with a different config.
        CheckpointError: the checkpoint to resume from is unreadable or does not fit the model.
        FloatingPointError: the loss became NaN or infinite.
    """
    cfg = config
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    _check_data(train_x, train_y, "train_x", "train_y")
    if (val_x is None) != (val_y is None):
        raise ValueError("pass both val_x and val_y, or neither")
    if val_x is not None:
        _check_data(val_x, val_y, "val_x", "val_y")
    n = train_x.shape[0]
    steps_per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"drop_last with batch_size {cfg.batch_size} leaves no batch from {n} training samples")
    loss_fn = loss_fn if loss_fn is not None else cfg.loss()
    device = torch.device(cfg.device)
    prev_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _Run(model, cfg, device, train_x, train_y, val_x, val_y, augment, loss_fn, steps_per_epoch
                    ).run(resume)
    finally:
        torch.set_num_threads(prev_threads)
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)  # type: ignore[call-arg]


class _Run:
    """The state of one training run (kept in one place so checkpointing sees all of it)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, train_x: torch.Tensor,
                 train_y: torch.Tensor, val_x: torch.Tensor | None, val_y: torch.Tensor | None,
                 augment: Augment | None, loss_fn: LossFn, steps_per_epoch: int) -> None:
        self.model, self.cfg, self.device = model.to(device), cfg, device
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
        self.x, self.y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.augment, self.loss_fn, self.spe = augment, loss_fn, steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.optimizer = _make_optimizer(model, cfg)
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(warmup=warmup, total=cfg.epochs * steps_per_epoch,
                                         min_ratio=cfg.min_lr_ratio, cosine=cfg.schedule == "cosine"))
        # Two private streams: data order and augmentation, so that neither disturbs the other or the global RNG.
        self.order_gen = torch.Generator().manual_seed(2 * cfg.seed)
        self.aug_gen = torch.Generator().manual_seed(2 * cfg.seed + 1)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None  # position inside an epoch cut by max_steps
        self.ckpt = cfg.checkpoint_dir / CHECKPOINT_NAME if cfg.checkpoint_dir is not None else None

    # --------------------------------------------------------------------------------------- checkpoints
    def _generators(self) -> dict[str, torch.Generator]:
        return {"order": self.order_gen, "augment": self.aug_gen}

    def _save(self) -> Path:
        assert self.ckpt is not None
        config = self.cfg.to_dict()
        state = TrainingState(epoch=self.epoch, step=self.step, optimizer=self.optimizer.state_dict(),
                              scheduler=self.scheduler.state_dict(),
                              rng=TrainingState.capture_rng(self._generators()),
                              extra={"config": config, "history": self.history, "partial_epoch": self.partial})
        summary = {"config": config, "epoch": self.epoch, "step": self.step, "history": self.history}
        return save_model(self.model, self.ckpt, extras={"train": summary}, training_state=state)

    def _resume(self) -> None:
        assert self.ckpt is not None
        state = load_training_state(self.ckpt)
        saved = state.extra.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {self.ckpt}: its training state records no TrainConfig")
        current = self.cfg.to_dict()
        # A field added to TrainConfig after the checkpoint was written counts as its default value there.
        defaults = TrainConfig.from_dict({}).to_dict()
        diffs = [f"{k}: {saved.get(k, defaults[k])!r} in the checkpoint, {v!r} now" for k, v in current.items()
                 if k not in _RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
        if diffs:
            raise ValueError(f"cannot resume from {self.ckpt}: it was written by a run with another config ("
                             + "; ".join(diffs) + "); pass resume=False or use another checkpoint_dir")
        load_weights(self.model, self.ckpt, strict=True)
        try:
            self.optimizer.load_state_dict(state.optimizer)
            if state.scheduler is not None:
                self.scheduler.load_state_dict(state.scheduler)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.ckpt}: its optimizer/scheduler state does not fit this "
                                  f"model ({e})") from None
        state.restore_rng(self._generators())
        self.epoch, self.step = state.epoch, state.step
        self.history = list(state.extra.get("history") or [])
        self.partial = state.extra.get("partial_epoch")

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        resumed_from = None
        if resume and self.ckpt is not None and self.ckpt.exists():
            self._resume()
            resumed_from = self.ckpt
        else:
            torch.manual_seed(cfg.seed)  # seeds CUDA too; a resumed run restores the saved states instead
        last_ckpt = self.ckpt if resumed_from is not None else None
        while self.epoch < cfg.epochs and not self._step_limit_reached():
            finished = self._train_epoch()
            if finished:
                self.epoch += 1
                self.partial = None
                self.history.append(self._epoch_summary())
            due = (not finished or self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs
                   or self._step_limit_reached())
            if self.ckpt is not None and due:
                last_ckpt = self._save()
            if not finished:
                break
        return TrainResult(history=list(self.history), checkpoint=last_ckpt, epochs_completed=self.epoch,
                           steps=self.step, resumed_from=resumed_from)

    def _step_limit_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _train_epoch(self) -> bool:
        """Train (the rest of) one epoch; False when ``max_steps`` cut it short."""
        cfg, bs = self.cfg, self.cfg.batch_size
        p = self.partial
        if p is not None:  # resuming inside an epoch: replay its data order, skip the batches already done
            self.order_gen.set_state(p["order_state"])
            start_batch, seconds, sums = int(p["batch"]), float(p["seconds"]), dict(p["sums"])
        else:
            start_batch, seconds, sums = 0, 0.0, {}
        order_state = self.order_gen.get_state()
        perm = torch.randperm(self.x.shape[0], generator=self.order_gen)
        acc = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in sums.items()}
        self.model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=self.spe, initial=start_batch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and sys.stderr.isatty()), file=sys.stderr)
        batch = start_batch
        try:
            for batch in range(start_batch, self.spe):
                idx = perm[batch * bs:(batch + 1) * bs]
                loss_value = self._train_step(idx, acc)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if self._step_limit_reached() and batch + 1 < self.spe:
                    break
        finally:
            bar.close()
        seconds += time.perf_counter() - t0
        self._epoch_sums = {k: float(v) for k, v in acc.items()}
        self._epoch_seconds = seconds
        if batch + 1 < self.spe:
            self.partial = {"batch": batch + 1, "order_state": order_state, "seconds": seconds,
                            "sums": self._epoch_sums}
            return False
        return True

    def _train_step(self, idx: torch.Tensor, acc: dict[str, torch.Tensor]) -> float:
        xb = self.x[idx.to(self.x.device)].to(self.device, non_blocking=True)
        yb = self.y[idx.to(self.y.device)].to(self.device, non_blocking=True)
        if self.augment is not None:
            xb = self.augment(xb, generator=self.aug_gen)
        if self.cfg.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        set_train_progress(self.model, self.step / max(self.total_steps, 1))
        out = self.model(xb)
        parts = self.loss_fn(out, yb)
        if isinstance(parts, torch.Tensor):
            parts = {"loss": parts}
        elif not isinstance(parts, Mapping) or "loss" not in parts:
            raise TypeError("loss_fn must return a tensor or a dict with a 'loss' entry")
        loss = parts["loss"]
        aux = getattr(out, "aux_losses", None) or {}
        for value in aux.values():
            loss = loss + value
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the training loss is {loss_value} at step {self.step} (epoch "
                                     f"{self.epoch + 1}); lower the learning rate or clip gradients (grad_clip)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        # Running sums on the device (sample-weighted means; counts for accuracies), read once per epoch.
        b = yb.shape[0]
        logged = {"loss": loss.detach(), **{f"aux/{k}": v.detach() for k, v in aux.items()},
                  **{k: v for k, v in parts.items() if k != "loss"}}
        for key, value in logged.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                continue
            v = value.detach().to(torch.float64).reshape(())
            contrib = v if key.startswith("correct/") else v * b
            acc[key] = acc[key] + contrib if key in acc else contrib.to(self.device)
        acc["samples"] = acc["samples"] + b if "samples" in acc else torch.tensor(float(b), dtype=torch.float64,
                                                                                  device=self.device)
        return loss_value

    def _epoch_summary(self) -> dict[str, Any]:
        sums = self._epoch_sums
        seen = sums.get("samples", 0.0) or 1.0
        entry: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                                 "lr": float(self.optimizer.param_groups[0]["lr"]),
                                 "seconds": round(self._epoch_seconds, 4)}
        for key in sorted(sums):
            if key == "samples":
                continue
            if key == "loss":
                entry["train_loss"] = sums[key] / seen
            elif key.startswith("correct/"):
                entry["train_acc/" + key.split("/", 1)[1]] = sums[key] / seen
            else:
                entry[f"train/{key}"] = sums[key] / seen
        if self.val_x is not None and self.val_y is not None:
            res = evaluate(self.model, self.val_x, self.val_y, batch_size=self.cfg.eval_batch_size, mode=Mode.TRAIN,
                           device=self.device)
            entry["val_acc"] = res.accuracy
            for k, a in enumerate(res.exit_accuracy or []):
                entry[f"val_acc/exit{k}"] = a
        return entry


# ---------------------------------------------------------------------------------------------------- helpers
def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_data(x: Any, y: Any, x_name: str, y_name: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{x_name} and {y_name} must be torch tensors, got {type(x).__name__} and "
                        f"{type(y).__name__}")
    if not x.is_floating_point() and x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{x_name} must be a floating-point tensor (or int64 token ids for a sequence model), "
                        f"got dtype {x.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{y_name} must hold integer class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{y_name} must have shape (N,), got {tuple(y.shape)}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} and {y_name} hold different numbers of samples: "
                         f"{tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} is empty")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _accepts_mode(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "mode" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
