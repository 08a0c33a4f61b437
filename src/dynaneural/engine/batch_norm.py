"""Re-estimate batch-norm statistics under the decisions a dynamic network takes at inference.

A dynamic network is trained with relaxed or noisy decisions (Gumbel masks, sampled gates) but deployed with
hard, deterministic ones. Its batch-norm layers accumulate their running statistics under the training
decisions, so at inference they normalise features drawn from a different distribution; the deployed network
can lose far more accuracy than its decisions alone explain (BENCHMARKS.md, DynConv on CIFAR-10). The same
problem, and the same fix, appear in slimmable networks (J. Yu, T. Huang, "Universally Slimmable Networks and
Improved Training Techniques", ICCV 2019, arXiv:1903.05134: "post-statistics of BN") and in SWA's ``bn_update``.

:func:`recalibrate_batch_norm` resets every batch norm's running statistics and re-accumulates them as exact
cumulative averages (``momentum=None``) over calibration inputs, with the network in ``simulate`` mode: hard
inference decisions, every layer computed (the reference semantics), batch norms in training mode and
everything else in eval mode, autograd off. Execute mode folds the new statistics into its convolutions on the
next call. Nothing is lost on failure: if a forward pass raises, the previous statistics are put back.

The statistics are those of the simulate path, which computes a masked layer at every position: positions the
decision discards are included in the averages. That is the usual approximation (masked-dense training
statistics are computed the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynaneural.contract import DynamicModel

__all__ = ["BatchNormRecalibration", "recalibrate_batch_norm"]


@dataclass(frozen=True)
class BatchNormRecalibration:
    """What :func:`recalibrate_batch_norm` did.

    Attributes:
        layers: batch-norm layers whose statistics were re-estimated.
        samples: calibration inputs run. batches: forward passes.
        mode: the mode dynamic networks ran in (``None`` for a plain module).
        max_mean_shift: largest absolute change of any running mean (a size of the mismatch that was fixed).
    """

    layers: int
    samples: int
    batches: int
    mode: str | None
    max_mean_shift: float


def recalibrate_batch_norm(model: nn.Module, inputs: torch.Tensor, *, mode: str = "simulate",
                           batch_size: int = 256) -> BatchNormRecalibration:
    """Re-estimate the running statistics of every batch norm of ``model`` on ``inputs`` under ``mode``.

    Args:
        model: a module with batch norms; a :class:`DynamicModel` runs in ``mode`` (``simulate`` or ``train``;
            ``execute`` folds batch norm into its convolutions and cannot update it).
        inputs: (N, ...) calibration inputs (no labels needed), e.g. a few thousand training images.
        mode: decision mode of a dynamic network during the passes.
        batch_size: inputs per forward pass (each pass normalises with its own batch statistics, as in training).

    Returns:
        A :class:`BatchNormRecalibration` summary. The model's train/eval state and each layer's momentum are
        restored.

    Raises:
        ValueError: no batch norm tracks running statistics, ``inputs`` is empty or not finite, ``batch_size`` < 2,
            or ``mode`` is ``execute``.
    """
    if mode == "execute":
        raise ValueError("execute mode folds batch norm into the convolutions; recalibrate in 'simulate' mode")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (batch statistics need two samples), got {batch_size}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a non-empty (N, ...) tensor")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs contain NaN or infinite values")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no batch norm that tracks running statistics")
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    momenta = [bn.momentum for bn in bns]
    was_training = [m.training for m in model.modules()]
    is_dynamic = isinstance(model, DynamicModel)
    device = next((p.device for p in model.parameters()), inputs.device)
    n, batches = inputs.shape[0], 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: exact mean of the per-batch statistics
            bn.train()
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb = inputs[start:start + batch_size].to(device)
                if xb.shape[0] < 2 and batches:  # a trailing single sample has no batch variance: skip it
                    break
                if is_dynamic:
                    model(xb, mode=mode)
                else:
                    model(xb)
                batches += 1
    except BaseException:
        for bn, state in zip(bns, saved, strict=True):
            bn.load_state_dict(state)
        raise
    finally:
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        for m, t in zip(model.modules(), was_training, strict=True):
            m.training = t
    shift = max(float((bn.running_mean - s["running_mean"]).abs().max()) for bn, s in zip(bns, saved, strict=True)
                if bn.running_mean is not None)
    return BatchNormRecalibration(layers=len(bns), samples=min(n, batches * batch_size), batches=batches,
                                  mode=mode if is_dynamic else None, max_mean_shift=shift)
