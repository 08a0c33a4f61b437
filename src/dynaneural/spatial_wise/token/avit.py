"""A-ViT: adaptive tokens, per-token halting in a vision transformer.

Paper: H. Yin, A. Vahdat, J. M. Alvarez, A. Mallya, J. Kautz, P. Molchanov, "A-ViT: Adaptive Tokens for Efficient
Vision Transformer", CVPR 2022, arXiv:2112.07658.

Every token carries an ACT-style halting score (Graves, 2016, arXiv:1603.08983) read, without extra parameters,
from the first channel of its embedding after each block: ``h = sigmoid(γ · e_0 - β)`` (Eq. 4; γ = 10, β = 30 in
the paper's code — ``gate_scale`` and ``gate_center`` here). A token halts at the first block where its
cumulative score reaches ``1 - ε``; from then on it is neither updated nor attended to. Its output is the ACT
mean-field state ``Σ_l w_l e^l`` with ``w_l = h_l`` before halting and the remainder ``R = 1 - Σ h`` at the halting
block (Eq. 6); the class token's output is classified. The last block halts every token still running.

Losses (``aux_losses``, train mode): the ponder loss ``α_p · mean_k (N_k + R_k)`` (Eq. 7) and the distributional
prior ``α_d · KL(H ‖ H_target)`` between the per-block mean halting score over the batch (normalised over depth)
and a Gaussian centred at ``target_depth`` (Eq. 8–9).

Modes: train and simulate compute every token at every block (halted tokens frozen and masked out of attention
keys with ``-inf``); execute packs the tokens still running into a ragged batch (:class:`~dynaneural.spatial_wise.
token.vit.RaggedLayout`) before every block, so halted tokens are never computed again and an image whose
tokens have all halted leaves the batch. The public A-ViT code only *masks* halted tokens (multiplies them by
zero and keeps computing the full sequence), so it realises no speed-up; this execution does.

``halt_threshold`` (``1 - ε``, 0.99 by default) is the knob calibration moves. In ``all_on()`` nothing halts and
the output is the last block's class token, i.e. the backbone ViT the method is fine-tuned from (the static twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.registry import register_model
from dynaneural.spatial_wise.token.vit import (
    RaggedLayout,
    VisionTransformer,
    ViTConfig,
    ViTCost,
    calibrate_token_knob,
    check_images,
    ragged_block,
)

__all__ = ["AViT", "AViTConfig", "AViTOutput"]


@dataclass(frozen=True)
class AViTConfig:
    """Args:
    vit: the backbone. gate_scale, gate_center: γ and β of the halting score sigmoid(γ·e_0 − β).
    halt_threshold: a token halts when its cumulative score reaches this (1 − ε).
    ponder_weight: α_p. distr_weight: α_d. target_depth: mean of the Gaussian depth prior (blocks, 0-based).
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    gate_scale: float = 10.0
    gate_center: float = 30.0
    halt_threshold: float = 0.99
    ponder_weight: float = 5e-4
    distr_weight: float = 0.1
    target_depth: float | None = None

    def __post_init__(self) -> None:
        if self.halt_threshold <= 0:
            raise ValueError(f"halt_threshold must be positive, got {self.halt_threshold}")
        if self.ponder_weight < 0 or self.distr_weight < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass
class AViTOutput(DynamicOutput):
    """Adds ``ponder`` (B, N): N_k + R_k per token, and ``halting`` (B, L): the halting score of every token
    at every block, averaged over the tokens (train/simulate only)."""

    ponder: torch.Tensor | None = None
    halting: torch.Tensor | None = None


class AViT(AllOnFlag, DynamicModel):
    """A-ViT on a small ViT; see the module docstring."""

    def __init__(self, cfg: AViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vit)
        self.register_buffer("halt_threshold", torch.tensor(float(cfg.halt_threshold)))
        self.input_shape = cfg.vit.input_shape
        self.num_classes = cfg.vit.num_classes
        self.cost = ViTCost(cfg.vit)
        depth = cfg.vit.depth
        mu = cfg.target_depth if cfg.target_depth is not None else (depth - 1) / 2
        prior = torch.exp(-0.5 * (torch.arange(depth, dtype=torch.float32) - mu) ** 2)
        self.register_buffer("depth_prior", prior / prior.sum())
        self._all_on = False

    # ------------------------------------------------------------------------------------------- contract
    # all_on() comes from AllOnFlag: No token halts; the output is the last block's class token (the backbone ViT).

    def to_static(self) -> VisionTransformer:
        return self.vit

    def calibrate(self, x: torch.Tensor, *, budget: float, unit: str = "fraction", batch_size: int = 256) -> Any:
        """Fit ``halt_threshold`` (1 − ε) to a budget on ``x``: higher thresholds halt later and cost more."""
        return calibrate_token_knob(self, x, budget=budget, knob="halt_threshold", lo=1e-3,
                                    hi=float(self.cfg.vit.depth), unit=unit, batch_size=batch_size)

    def halting_score(self, e: torch.Tensor) -> torch.Tensor:
        """h = sigmoid(γ · e[..., 0] − β): from the first embedding channel, no extra parameters."""
        return torch.sigmoid(e[..., 0] * self.cfg.gate_scale - self.cfg.gate_center)

    def _bookkeeping(self, layer: int) -> float:
        """FLOPs per running token of the halting unit at a block: one MAC for h (not at the last block, which
        halts everything), D for the ACT accumulation of the output."""
        return float(self.cfg.vit.dim + (1 if layer < self.cfg.vit.depth - 1 else 0))

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> AViTOutput:
        mode = resolve_mode(self, mode)
        check_images(self, x)
        if self._all_on:
            return self._static(x, mode)
        if mode is Mode.EXECUTE:
            return self._execute(x)
        return self._full(x, mode)

    def _static(self, x: torch.Tensor, mode: Mode) -> AViTOutput:
        b, n, depth = x.shape[0], self.cfg.vit.num_tokens, self.cfg.vit.depth
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.static_total())
        dec = {"depth": torch.full((b, n), depth, dtype=torch.long, device=x.device),
               "tokens": torch.full((b, depth), n, dtype=torch.long, device=x.device)}
        return AViTOutput(logits=self.vit(x), cost=ledger.flops, decisions=dec, mode=mode)

    def _full(self, x: torch.Tensor, mode: Mode) -> AViTOutput:
        """Train / simulate: every token at every block; halted tokens frozen and masked out of attention."""
        b, n, depth = x.shape[0], self.cfg.vit.num_tokens, self.cfg.vit.depth
        thr = float(self.halt_threshold)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.embed + self.cost.head)
        t = self.vit.embed(x)
        active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        c = t.new_zeros(b, n)
        rem = t.new_ones(b, n)
        out = torch.zeros_like(t)
        ponder = t.new_zeros(b, n)
        depth_of = torch.zeros(b, n, dtype=torch.long, device=x.device)
        tokens, h_means = [], []
        neg_inf = torch.tensor(-math.inf, device=x.device)
        for i, blk in enumerate(self.vit.blocks):
            count = active.sum(1)
            tokens.append(count)
            ledger.charge(self.cost.block(count.double()) + count.double() * self._bookkeeping(i))
            bias = None if i == 0 else torch.where(active, 0.0, neg_inf).view(b, 1, 1, n)
            t = torch.where(active.unsqueeze(-1), blk(t, bias), t)  # halted tokens keep their state
            h = self.halting_score(t) if i < depth - 1 else torch.ones_like(c)
            h_means.append(h.mean())
            c_new = c + h
            reached = active if i == depth - 1 else active & (c_new >= thr)
            cont = active & ~reached
            w = torch.where(cont, h, torch.where(reached, rem, torch.zeros_like(h)))  # ACT weights (Eq. 6)
            out = out + w.unsqueeze(-1) * t
            ponder = ponder + active.to(t.dtype) + torch.where(reached, rem, torch.zeros_like(rem))  # N + R
            rem = torch.where(cont, rem - h, rem)
            c = c_new
            depth_of = depth_of + active.long()
            active = cont
        logits = self.vit.classify(out[:, 0])
        aux: dict[str, torch.Tensor] = {}
        halting = torch.stack(h_means)
        if mode is Mode.TRAIN:
            if self.cfg.ponder_weight:
                aux["ponder"] = self.cfg.ponder_weight * ponder.mean()
            if self.cfg.distr_weight and depth > 1:
                distr = (halting / halting.sum()).clamp(0.01, 0.99)
                aux["distr_prior"] = self.cfg.distr_weight * F.kl_div(distr.log(), self.depth_prior,
                                                                      reduction="sum")
        dec = {"depth": depth_of, "tokens": torch.stack(tokens, 1)}
        return AViTOutput(logits=logits, cost=ledger.flops, decisions=dec, mode=mode, aux_losses=aux,
                          ponder=ponder, halting=halting.detach())

    def _execute(self, x: torch.Tensor) -> AViTOutput:
        """Execute: before each block the running tokens are re-packed; halted ones are never computed again."""
        b, n, depth = x.shape[0], self.cfg.vit.num_tokens, self.cfg.vit.depth
        thr = float(self.halt_threshold)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.embed + self.cost.head)
        t = self.vit.embed(x)
        d = t.shape[-1]
        layout = RaggedLayout.full(b, n, x.device)
        xp = t.reshape(b * n, d)
        c = xp.new_zeros(b * n)
        rem = xp.new_ones(b * n)
        out = torch.zeros_like(xp)  # (B·N, D): the ACT output of every token, by input sample and position
        depth_of = torch.zeros(b * n, dtype=torch.long, device=x.device)
        tokens = []
        for i, blk in enumerate(self.vit.blocks):
            tokens.append(layout.per_sample(b))
            ledger.charge(self.cost.block(layout.counts.double()) + layout.counts.double() * self._bookkeeping(i),
                          layout.sample)
            xp = ragged_block(blk, xp, layout)
            flat = layout.sample.index_select(0, layout.row) * n + layout.orig  # (T,) into (B·N)
            depth_of.index_add_(0, flat, torch.ones_like(flat))
            if i == depth - 1:  # the last block halts everything still running, with its remainder
                out.index_add_(0, flat, rem.unsqueeze(-1) * xp)
                break
            h = self.halting_score(xp)
            c_new = c + h
            reached = c_new >= thr
            w = torch.where(reached, rem, h)
            out.index_add_(0, flat, w.unsqueeze(-1) * xp)
            if bool(reached.any()):
                layout, index = layout.select(~reached)
                if layout.num_tokens == 0:
                    break
                xp, c, rem = xp.index_select(0, index), c_new.index_select(0, index), (rem - h).index_select(0, index)
            else:
                c, rem = c_new, rem - h
        logits = self.vit.classify(out.view(b, n, d)[:, 0])
        tok = torch.stack(tokens + [torch.zeros(b, dtype=torch.long, device=x.device)] * (depth - len(tokens)), 1)
        dec = {"depth": depth_of.view(b, n), "tokens": tok}
        return AViTOutput(logits=logits, cost=ledger.flops, decisions=dec, mode=Mode.EXECUTE)


def _build(vit: dict[str, Any], **kw: Any) -> AViT:
    return AViT(AViTConfig(vit=ViTConfig(**vit), **kw))


@register_model
def avit_mnist(*, dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, gate_scale: float = 10.0,
               gate_center: float = 30.0, halt_threshold: float = 0.99, ponder_weight: float = 5e-4,
               distr_weight: float = 0.1, target_depth: float | None = None, num_classes: int = 10,
               stem: str = "patch") -> AViT:
    """MNIST / Fashion-MNIST: 7×7 patches of 4×4, D=64, 6 blocks (the DynamicViT backbone).
    ``stem="conv"``: the convolutional stem (see ``ViTConfig``)."""
    return _build(dict(in_chans=1, img_size=28, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                       num_classes=num_classes, stem=stem), gate_scale=gate_scale, gate_center=gate_center,
                  halt_threshold=halt_threshold, ponder_weight=ponder_weight, distr_weight=distr_weight,
                  target_depth=target_depth)


@register_model
def avit_cifar10(*, dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, gate_scale: float = 10.0,
                 gate_center: float = 30.0, halt_threshold: float = 0.99, ponder_weight: float = 5e-4,
                 distr_weight: float = 0.1, target_depth: float | None = None, num_classes: int = 10,
                 stem: str = "patch") -> AViT:
    """CIFAR-10: 8×8 patches of 4×4, D=128, 6 blocks.
    ``stem="conv"``: the convolutional stem (see ``ViTConfig``)."""
    return _build(dict(in_chans=3, img_size=32, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                       num_classes=num_classes, stem=stem), gate_scale=gate_scale, gate_center=gate_center,
                  halt_threshold=halt_threshold, ponder_weight=ponder_weight, distr_weight=distr_weight,
                  target_depth=target_depth)


@register_model
def test_avit(*, halt_threshold: float = 0.99) -> AViT:
    """Tiny variant for tests: 12×12 inputs, 3×3 patches, D=16, 4 blocks; γ=4, β=0 so tokens halt after about
    two blocks, at different depths."""
    return _build(dict(in_chans=1, img_size=12, patch_size=4, dim=16, depth=4, heads=2, mlp_ratio=2.0, num_classes=5),
                  gate_scale=4.0, gate_center=0.0, halt_threshold=halt_threshold)
