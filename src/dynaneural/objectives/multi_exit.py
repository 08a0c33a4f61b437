"""The multi-exit training objective: weighted cross-entropy over exits, self-distillation, exit-policy BCE.

Papers:

* Deep supervision of every exit with a weighted sum of cross-entropies is the standard multi-exit objective
  (BranchyNet, Teerapittayanon et al., ICPR 2016, arXiv:1709.01686; MSDNet, Huang et al., ICLR 2018,
  arXiv:1703.09844, with equal weights).
* Self-distillation: L. Zhang, J. Song, A. Gao, J. Chen, C. Bao, K. Ma, "Be Your Own Teacher: Improve the
  Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019, arXiv:1905.08094. The deepest
  classifier teaches the shallow ones; per shallow exit ``i`` their loss is
  ``(1 - α) · CE(q_i, y) + α · KL(q_C ‖ q_i)`` with softened distributions ``q = softmax(z / T)``
  (their feature-hint term ``λ‖F_i − F_C‖²`` is not used here). As usual for distillation at temperature ``T``
  the KL term is multiplied by ``T²`` so its gradients keep their scale (Hinton et al., 2015).
* Learned exit policies: a small head per intermediate exit predicts whether that exit is already right; it is
  trained with binary cross-entropy against the target ``argmax(z_k) == y``
  (:class:`dynaneural.policies.ExitPolicyHead`).

The full objective, with exit weights ``w`` (normalised to sum to one unless ``normalise=False``) and ``K`` exits::

    loss = Σ_{k<K} w_k [(1 − α) CE_k + α T² KL(softmax(z_K/T).detach() ‖ softmax(z_k/T))] + w_K CE_K
           + β · mean_k BCE(policy_k, [argmax z_k = y])

With ``α = 0`` it is the plain weighted cross-entropy; with one exit (a plain classifier) it is cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MultiExitLoss", "exit_weights"]


def exit_weights(weights: str | Sequence[float], num_exits: int, *, normalise: bool = True) -> torch.Tensor:
    """(K,) float32 exit weights from ``"uniform"`` (all 1), ``"linear"`` (w_k = k + 1) or an explicit list,
    scaled to sum to one unless ``normalise=False``."""
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if isinstance(weights, str):
        if weights == "uniform":
            w = torch.ones(num_exits)
        elif weights == "linear":
            w = torch.arange(1, num_exits + 1, dtype=torch.float32)
        else:
            raise ValueError(f"exit weights must be 'uniform', 'linear' or a list of numbers, got {weights!r}")
    else:
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float32)
        if w.numel() != num_exits:
            raise ValueError(f"got {w.numel()} exit weights for a model with {num_exits} exits")
    return w / w.sum() if normalise else w


@dataclass(frozen=True, kw_only=True)
class MultiExitLoss:
    """Weighted cross-entropy over exits, with optional self-distillation and exit-policy BCE (see module doc).

    Args:
        weights: ``"uniform"``, ``"linear"`` (later exits weigh more, w_k ∝ k + 1) or one non-negative number
            per exit; normalised to sum to one unless ``normalise`` is off.
        normalise: scale the weights to sum to one (the default: the loss has the scale of one cross-entropy
            whatever the number of exits). ``False`` sums the exits' losses as given ("uniform" = a plain sum), as
            slimmable networks do (Yu et al., ICLR 2019): each width then gets the full gradient of its own
            loss instead of ``1/K`` of it, which with SGD is the same as a ``K``× learning rate and a ``1/K``
            weight decay.
        distill_alpha: α, the share of the distillation term in each shallow exit's loss (0 disables it).
        distill_temperature: T, the softening temperature of teacher and students.
        policy_weight: β, the weight of the exit-policy BCE (used only when the output has ``policy_logits``).
        label_smoothing: label smoothing of every cross-entropy term.

    Call it as ``loss_fn(output, target)`` where ``output`` is a model output with ``exit_logits`` (and
    optionally ``policy_logits``), an output with only ``logits``, a (B, C) tensor, or a list of (B, C) tensors.
    It returns a dict: ``loss`` (the total, to backpropagate), ``ce/exit{k}``, ``distill``, ``policy`` and
    ``correct/exit{k}`` (the number of samples exit k classifies right); every entry but ``loss`` is detached.
    """

    weights: str | tuple[float, ...] = "uniform"
    distill_alpha: float = 0.0
    distill_temperature: float = 3.0
    policy_weight: float = 1.0
    label_smoothing: float = 0.0
    normalise: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.normalise, bool):
            raise ValueError(f"normalise must be a bool, got {self.normalise!r}")
        if isinstance(self.weights, str):
            if self.weights not in ("uniform", "linear"):
                raise ValueError(f"weights must be 'uniform', 'linear' or a list of numbers, got {self.weights!r}")
        else:
            try:
                w = tuple(float(v) for v in self.weights)
            except (TypeError, ValueError):
                raise ValueError(f"weights must be 'uniform', 'linear' or a list of numbers, "
                                 f"got {self.weights!r}") from None
            if not w or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
                raise ValueError(f"explicit exit weights must be finite, non-negative and not all zero, got {w}")
            object.__setattr__(self, "weights", w)  # frozen: normalise a list to a hashable tuple
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature}")
        if not (self.policy_weight >= 0 and math.isfinite(self.policy_weight)):
            raise ValueError(f"policy_weight must be non-negative, got {self.policy_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        w = self.weights if isinstance(self.weights, str) else list(self.weights)
        return {"weights": w, "distill_alpha": self.distill_alpha, "distill_temperature": self.distill_temperature,
                "policy_weight": self.policy_weight, "label_smoothing": self.label_smoothing,
                "normalise": self.normalise}

    def __call__(self, output: Any, target: torch.Tensor) -> dict[str, torch.Tensor]:
        exit_logits, policy_logits = _unpack(output)
        k_exits = len(exit_logits)
        target = _check_target(target, exit_logits)
        w = exit_weights(self.weights, k_exits, normalise=self.normalise).to(exit_logits[0].device)
        parts: dict[str, torch.Tensor] = {}
        zero = exit_logits[-1].new_zeros((), dtype=torch.float32)
        total = zero
        alpha, t = self.distill_alpha, self.distill_temperature
        distill_terms: list[torch.Tensor] = []
        if alpha > 0 and k_exits > 1:
            teacher = (exit_logits[-1].detach().float() / t).log_softmax(-1)  # (B, C), no gradient to the teacher
        for k, logits in enumerate(exit_logits):
            z = logits.float()
            ce = F.cross_entropy(z, target, label_smoothing=self.label_smoothing)
            parts[f"ce/exit{k}"] = ce.detach()
            term = ce
            if alpha > 0 and k < k_exits - 1:
                # KL(teacher ‖ student) per sample, averaged over the batch, scaled by T² (see module doc).
                kl = F.kl_div((z / t).log_softmax(-1), teacher, reduction="batchmean", log_target=True) * (t * t)
                distill_terms.append(kl)
                term = (1 - alpha) * ce + alpha * kl
            total = total + w[k] * term
        parts["distill"] = torch.stack(distill_terms).mean().detach() if distill_terms else zero.detach()
        correct = [(logits.detach().argmax(-1) == target) for logits in exit_logits]  # K × (B,) bool
        for k, c in enumerate(correct):
            parts[f"correct/exit{k}"] = c.sum()
        if policy_logits is not None:
            if len(policy_logits) != k_exits - 1:
                raise ValueError(f"expected one policy logit tensor per intermediate exit ({k_exits - 1}), "
                                 f"got {len(policy_logits)}")
            bce = [F.binary_cross_entropy_with_logits(p.float(), correct[k].float())
                   for k, p in enumerate(policy_logits)]
            policy = torch.stack(bce).mean() if bce else zero
            parts["policy"] = policy.detach()
            total = total + self.policy_weight * policy
        else:
            parts["policy"] = zero.detach()
        parts["loss"] = total
        return parts


def _unpack(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """(exit logits, policy logits) of a model output, a tensor or a list of tensors."""
    if isinstance(output, torch.Tensor):
        exits: Any = [output]
        policy = None
    elif isinstance(output, (list, tuple)):
        exits, policy = list(output), None
    else:
        exits = getattr(output, "exit_logits", None)
        if exits is None:
            logits = getattr(output, "logits", None)
            if logits is None:
                raise TypeError(f"cannot read logits from a {type(output).__name__}: expected a tensor, a list of "
                                "tensors or an output with `exit_logits` or `logits` (run multi-exit models in "
                                "train mode)")
            exits = [logits]
        policy = getattr(output, "policy_logits", None)
    if not exits:
        raise ValueError("the output holds no exit logits")
    for k, z in enumerate(exits):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
            desc = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"exit {k} logits must be a floating-point (B, C) tensor, got {desc}")
        if z.shape != exits[0].shape:
            raise ValueError(f"every exit must give logits of the same shape; exit 0 has {tuple(exits[0].shape)}, "
                             f"exit {k} has {tuple(z.shape)}")
    return list(exits), (list(policy) if policy is not None else None)


def _check_target(target: Any, exit_logits: list[torch.Tensor]) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices (e.g. torch.long), got dtype {target.dtype}; "
                        "soft or one-hot targets are not supported")
    b, c = exit_logits[0].shape
    if target.dim() != 1 or target.shape[0] != b:
        raise ValueError(f"labels must have shape ({b},) to match logits of shape ({b}, {c}), "
                         f"got {tuple(target.shape)}")
    if b and (int(target.min()) < 0 or int(target.max()) >= c):
        raise ValueError(f"labels must lie in [0, {c - 1}] for {c} classes, got values in "
                         f"[{int(target.min())}, {int(target.max())}]")
    return target.to(device=exit_logits[0].device, dtype=torch.long)
