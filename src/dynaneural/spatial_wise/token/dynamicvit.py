"""DynamicViT: per-sample token pruning with lightweight prediction modules.

Paper: Y. Rao, W. Zhao, B. Liu, J. Lu, J. Zhou, C.-J. Hsieh, "DynamicViT: Efficient Vision Transformers with
Dynamic Token Sparsification", NeurIPS 2021, arXiv:2106.02034.

Before chosen blocks a prediction module (Sec. 3.2: a per-token MLP over the concatenation of a local feature and
the policy-weighted mean of the kept tokens' global features) scores every patch token that is still kept; the
class token is always kept and a dropped token stays dropped (hierarchical sparsification).

Modes:

* train — every token is computed; keep decisions are straight-through Gumbel samples (the paper's
  Gumbel-softmax), and dropped tokens are removed from attention with the paper's differentiable *attention
  masking* (Eq. 9: the attention weights are multiplied by the keep policy and renormalised). The ratio loss
  pulls the kept fraction after stage ``s`` toward ``keep_ratio^(s+1)`` (:class:`~dynaneural.policies.BudgetLoss`,
  squared, batch mean). With a teacher (:meth:`DynamicViT.set_teacher`, the paper's setting: the backbone before
  fine-tuning, frozen) two more terms (Sec. 3.4): KL divergence of the predictions to the teacher's
  (``kl_weight``) and the distance of every kept token's final feature to the teacher's token
  (``token_distill_weight``, the mean squared error over the tokens the policy keeps).
* simulate — the reference: every token of every sample is computed; a token is kept while its keep
  probability is at least ``threshold`` (one threshold, the knob calibration moves); pruned tokens are masked
  out of attention as keys with ``-inf``.
* execute — the same decisions, realised: the kept tokens are packed per sample (:class:`~dynaneural.
  spatial_wise.token.vit.RaggedLayout`), token-wise ops run on exactly them, attention pads only to the
  batch's longest row with a key-padding mask. Each sample pays for its own token counts (attention is
  quadratic in its own count) plus the prediction modules on the tokens they scored.

The paper keeps a fixed top-k per stage at inference (the same count for every image, so batches stay dense);
here the count is per sample, by threshold, which is what makes the ragged execution necessary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import BudgetLoss, TemperatureSchedule, binary_decision
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

__all__ = ["DynamicViT", "DynamicViTConfig", "DynamicViTOutput", "TokenPredictor"]


@dataclass(frozen=True)
class DynamicViTConfig:
    """Args:
    vit: the backbone. prune_before: blocks before which a prediction module prunes (increasing, >= 1).
    keep_ratio: ρ, the training target of the kept fraction after stage s is ρ^(s+1) (the paper's schedule).
    threshold: keep a token while its keep probability is >= threshold (inference; calibrated to a budget).
    ratio_weight: weight of the ratio loss. tau: Gumbel temperature over training.
    kl_weight, token_distill_weight: weights of the two teacher terms (used only once a teacher is set; the
    paper's λ_KL = λ_distill = 0.5).
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    prune_before: tuple[int, ...] = (2, 4)
    keep_ratio: float = 0.7
    threshold: float = 0.5
    ratio_weight: float = 2.0
    tau: TemperatureSchedule = field(default_factory=TemperatureSchedule)
    kl_weight: float = 0.5
    token_distill_weight: float = 0.5

    def __post_init__(self) -> None:
        pb = tuple(int(b) for b in self.prune_before)
        if not pb or list(pb) != sorted(set(pb)) or pb[0] < 1 or pb[-1] >= self.vit.depth:
            raise ValueError(f"prune_before must be increasing block indices in [1, {self.vit.depth}), got {pb}")
        object.__setattr__(self, "prune_before", pb)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.kl_weight < 0 or self.token_distill_weight < 0:
            raise ValueError(f"distillation weights must be >= 0, got {self.kl_weight}, {self.token_distill_weight}")


@dataclass
class DynamicViTOutput(DynamicOutput):
    """Adds ``keep_prob``: per stage the (B, N) keep probability of every patch token (train/simulate only)."""

    keep_prob: list[torch.Tensor] | None = None


class TokenPredictor(nn.Module):
    """The prediction module (Sec. 3.2): LN → Linear → GELU gives a local half and a global half; the global half
    is averaged over the kept tokens; an MLP on [local, global] gives the keep logit of each token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 1))

    @property
    def flops_per_token(self) -> float:
        d = self.dim
        return float(5 * d + d * d + d * (d // 2) + (d // 2) * (d // 4) + d // 4)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) patch tokens, policy (B, N) in [0, 1] (the tokens still kept) → keep logits (B, N)."""
        h = self.in_conv(x)
        half = self.dim // 2
        w = policy.unsqueeze(-1).to(h.dtype)
        g = (h[..., half:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)  # (B, 1, D/2)
        return self.out_conv(torch.cat([h[..., :half], g.expand(-1, h.shape[1], -1)], -1)).squeeze(-1)

    def forward_packed(self, x: torch.Tensor, row: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Packed kept tokens x (T, D) of rows ``row`` (T,) → keep logits (T,): the global feature is each row's
        mean over its own kept tokens."""
        h = self.in_conv(x)
        half = self.dim // 2
        sums = h.new_zeros(num_rows, self.dim - half).index_add_(0, row, h[:, half:])
        counts = torch.bincount(row, minlength=num_rows).clamp_min(1).to(h.dtype)
        g = (sums / counts[:, None]).index_select(0, row)
        return self.out_conv(torch.cat([h[:, :half], g], -1)).squeeze(-1)


class DynamicViT(AllOnFlag, DynamicModel):
    """DynamicViT on a small ViT; see the module docstring."""

    def __init__(self, cfg: DynamicViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vit)
        self.predictors = nn.ModuleList(TokenPredictor(cfg.vit.dim) for _ in cfg.prune_before)
        self.register_buffer("threshold", torch.tensor(float(cfg.threshold)))
        self.input_shape = cfg.vit.input_shape
        self.num_classes = cfg.vit.num_classes
        self.cost = ViTCost(cfg.vit)
        self.ratio_losses = nn.ModuleList(BudgetLoss(target=cfg.keep_ratio ** (s + 1), weight=cfg.ratio_weight)
                                          for s in range(len(cfg.prune_before)))
        self._tau = cfg.tau(0.0)
        self._all_on = False
        self._teacher: tuple[VisionTransformer, ...] = ()  # a tuple: not a submodule, not in the state dict

    def set_teacher(self, teacher: VisionTransformer | None) -> None:
        """Distil from ``teacher`` in training (the paper: the backbone before fine-tuning). It is frozen, kept
        out of this model's parameters and checkpoints; ``None`` removes it."""
        if teacher is None:
            self._teacher = ()
            return
        if not isinstance(teacher, VisionTransformer) or teacher.cfg != self.cfg.vit:
            raise ValueError("the teacher must be a VisionTransformer with this model's ViTConfig")
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)

    def _distill(self, x: torch.Tensor, t: torch.Tensor, logits: torch.Tensor, policy: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        """The paper's teacher terms: KL(teacher ‖ student) on the predictions, MSE of the kept tokens."""
        teacher = self._teacher[0]
        with torch.no_grad():
            tt = teacher.embed(x)
            for blk in teacher.blocks:
                tt = blk(tt)
            t_logits = teacher.classify(tt[:, 0])
        out: dict[str, torch.Tensor] = {}
        if self.cfg.kl_weight > 0:
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                                            reduction="batchmean")
            out["distill_kl"] = self.cfg.kl_weight * kl
        if self.cfg.token_distill_weight > 0:
            w = policy.unsqueeze(-1)  # (B, N-1, 1): the kept patch tokens (straight-through values)
            se = ((t[:, 1:] - tt[:, 1:]) ** 2 * w).sum() / (w.sum() * t.shape[-1]).clamp_min(1.0)
            out["distill_tokens"] = self.cfg.token_distill_weight * se
        return out

    # ------------------------------------------------------------------------------------------- contract
    def set_train_progress(self, progress: float) -> None:
        self._tau = self.cfg.tau(progress)

    # all_on() comes from AllOnFlag: Every token kept; the prediction modules are not even run (the static ViT).

    def to_static(self) -> VisionTransformer:
        """The static ViT (shares this model's backbone)."""
        return self.vit

    def calibrate(self, x: torch.Tensor, *, budget: float, unit: str = "fraction", batch_size: int = 256) -> Any:
        """Fit ``threshold`` so the mean cost on ``x`` meets ``budget`` (see ``calibrate_token_knob``)."""
        return calibrate_token_knob(self, x, budget=budget, knob="threshold", lo=0.0, hi=1.0, unit=unit,
                                    batch_size=batch_size)

    @property
    def _pruning(self) -> bool:
        # threshold 0 keeps everything whatever the predictors say: they are not run (like a disabled exit)
        return not self._all_on and float(self.threshold) > 0.0

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicViTOutput:
        mode = resolve_mode(self, mode)
        check_images(self, x)
        if mode is Mode.EXECUTE:
            return self._execute(x)
        return self._full(x, mode)

    def _full(self, x: torch.Tensor, mode: Mode) -> DynamicViTOutput:
        """Train / simulate: every token of every sample, pruned tokens masked out of attention."""
        b, n = x.shape[0], self.cfg.vit.num_tokens
        train = mode is Mode.TRAIN
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.embed + self.cost.head)
        t = self.vit.embed(x)
        policy = torch.ones(b, n - 1, device=x.device)  # patch tokens still kept (float: ST values in training)
        keeps, probs, tokens, aux = [], [], [], {}
        stage = 0
        pruned = False
        for i, blk in enumerate(self.vit.blocks):
            if self._pruning and i in self.cfg.prune_before:
                pred = self.predictors[stage]
                alive = (policy > 0.5).sum(1)  # (B,) tokens the predictor scores
                ledger.charge(alive.double() * pred.flops_per_token)
                logit = pred(t[:, 1:], policy)
                d = binary_decision(logit, training=train, relaxation="gumbel", tau=self._tau,
                                    threshold=float(self.threshold))
                policy = policy * (d.value if train else d.hard.to(policy.dtype))
                keeps.append(policy > 0.5)
                probs.append(d.prob)
                if train:
                    aux[f"ratio{stage}"] = self.ratio_losses[stage](policy.mean(1))
                stage += 1
                pruned = True
            full = torch.cat([policy.new_ones(b, 1), policy], 1)  # (B, N): the class token is always kept
            count = (full > 0.5).sum(1)
            tokens.append(count)
            ledger.charge(self.cost.block(count.double()))
            if not pruned:
                t = blk(t)
            elif train:
                t = blk(t, policy=full)
            else:
                bias = torch.zeros((), device=x.device).where(full > 0.5, float("-inf"))
                t = blk(t, bias.view(b, 1, 1, n))
        logits = self.vit.classify(t[:, 0])
        if train and self._teacher and pruned:
            aux.update(self._distill(x, t, logits, policy))
        return DynamicViTOutput(logits=logits, cost=ledger.flops, decisions=self._decisions(keeps, tokens, b),
                                mode=mode, aux_losses=aux, keep_prob=probs)

    def _execute(self, x: torch.Tensor) -> DynamicViTOutput:
        """Execute: pruned tokens are dropped from a packed ragged batch and never computed again."""
        b, n = x.shape[0], self.cfg.vit.num_tokens
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(self.cost.embed + self.cost.head)
        t = self.vit.embed(x)  # (B, N, D) dense until the first pruning stage
        layout: RaggedLayout | None = None
        xp = t
        keeps, tokens = [], []
        stage = 0
        for i, blk in enumerate(self.vit.blocks):
            if self._pruning and i in self.cfg.prune_before:
                if layout is None:
                    layout = RaggedLayout.full(b, n, x.device)
                    xp = t.reshape(b * n, -1)
                pred = self.predictors[stage]
                patch = (layout.rank > 0).nonzero().squeeze(1)  # rank 0 is always the class token
                ledger.charge((layout.counts - 1).double() * pred.flops_per_token, layout.sample)
                logit = pred.forward_packed(xp.index_select(0, patch), layout.row.index_select(0, patch),
                                            layout.num_rows)
                d = binary_decision(logit, training=False, threshold=float(self.threshold))
                keep = torch.ones(layout.num_tokens, dtype=torch.bool, device=x.device)
                keep.index_copy_(0, patch, d.hard)
                layout, index = layout.select(keep)
                xp = xp.index_select(0, index)
                keeps.append(layout.scatter_full(torch.ones_like(layout.orig, dtype=torch.bool), b, n, False)[:, 1:])
                stage += 1
            if layout is None:
                tokens.append(torch.full((b,), n, dtype=torch.long, device=x.device))
                ledger.charge(float(self.cost.block(float(n))))
                t = blk(t)
            else:
                tokens.append(layout.per_sample(b))
                ledger.charge(self.cost.block(layout.counts.double()), layout.sample)
                xp = ragged_block(blk, xp, layout)
        if layout is None:
            cls = t[:, 0]
        else:  # no row is ever dropped (the class token stays), so rows are the samples in order
            cls = xp.index_select(0, (layout.rank == 0).nonzero().squeeze(1))
        logits = self.vit.classify(cls)
        return DynamicViTOutput(logits=logits, cost=ledger.flops, decisions=self._decisions(keeps, tokens, b),
                                mode=Mode.EXECUTE)

    def _decisions(self, keeps: list[torch.Tensor], tokens: list[torch.Tensor], b: int) -> dict[str, torch.Tensor]:
        """``keep``: (B, S, N-1) bool, patch tokens kept after each stage; ``tokens``: (B, depth) tokens each
        block processed (class token included)."""
        dev = tokens[0].device
        keep = (torch.stack([k.bool() for k in keeps], 1) if keeps
                else torch.ones(b, 0, self.cfg.vit.num_patches, dtype=torch.bool, device=dev))
        return {"keep": keep, "tokens": torch.stack(tokens, 1)}


def _build(vit: dict[str, Any], **kw: Any) -> DynamicViT:
    return DynamicViT(DynamicViTConfig(vit=ViTConfig(**vit), **kw))


@register_model
def dynamicvit_mnist(*, dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0,
                     prune_before: tuple[int, ...] = (2, 4), keep_ratio: float = 0.7, threshold: float = 0.5,
                     ratio_weight: float = 2.0, kl_weight: float = 0.5, token_distill_weight: float = 0.5,
                     num_classes: int = 10,
                     stem: str = "patch") -> DynamicViT:
    """MNIST / Fashion-MNIST: 7×7 patches of 4×4, D=64, 6 blocks (~17 MFLOPs static), pruning before blocks 2, 4.
    ``stem="conv"``: the convolutional stem (see ``ViTConfig``)."""
    return _build(dict(in_chans=1, img_size=28, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                       num_classes=num_classes, stem=stem), prune_before=tuple(prune_before), keep_ratio=keep_ratio,
                  threshold=threshold, ratio_weight=ratio_weight, kl_weight=kl_weight,
                  token_distill_weight=token_distill_weight)


@register_model
def dynamicvit_cifar10(*, dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0,
                       prune_before: tuple[int, ...] = (2, 4), keep_ratio: float = 0.7, threshold: float = 0.5,
                       ratio_weight: float = 2.0, kl_weight: float = 0.5, token_distill_weight: float = 0.5,
                     num_classes: int = 10,
                       stem: str = "patch") -> DynamicViT:
    """CIFAR-10: 8×8 patches of 4×4, D=128, 6 blocks, pruning before blocks 2 and 4.
    ``stem="conv"``: the convolutional stem (see ``ViTConfig``)."""
    return _build(dict(in_chans=3, img_size=32, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                       num_classes=num_classes, stem=stem), prune_before=tuple(prune_before), keep_ratio=keep_ratio,
                  threshold=threshold, ratio_weight=ratio_weight, kl_weight=kl_weight,
                  token_distill_weight=token_distill_weight)


@register_model
def test_dynamicvit(*, threshold: float = 0.5) -> DynamicViT:
    """Tiny variant for tests: 12×12 inputs, 3×3 patches of 4×4, D=16, 3 blocks, pruning before blocks 1 and 2."""
    model = _build(dict(in_chans=1, img_size=12, patch_size=4, dim=16, depth=3, heads=2, mlp_ratio=2.0,
                        num_classes=5), prune_before=(1, 2), threshold=threshold)
    # A random predictor's logits barely depend on the token: spread them, and centre each stage's logits on a
    # fixed random batch so that about half the tokens are kept whatever the initialisation drew.
    x = torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        t = model.vit.embed(x)
        for i, pred in enumerate(model.predictors):
            last = pred.out_conv[-1]
            last.weight.mul_(40.0)
            last.bias.zero_()
            t = model.vit.blocks[i](t)
            last.bias.fill_(-float(pred(t[:, 1:], torch.ones(t.shape[:2], device=t.device)[:, 1:]).mean()))
    return model
