"""GFNet: glance and focus — a cheap look at the whole image, then full-resolution looks at chosen patches only.

Paper: Y. Wang, K. Lv, R. Huang, S. Song, L. Yang, G. Huang, "Glance and Focus: a Dynamic Approach to Reducing
Spatial Redundancy in Image Classification", NeurIPS 2020, arXiv:2010.05300.

Step 0 (*glance*): a small CNN reads the image down-sampled by ``glance_scale``; its pooled features update a
recurrent state (GRU cell) and a classifier predicts. Steps 1..T (*focus*): a patch policy reads the state and
picks one of L patch locations on a regular grid; a CNN processes only that ``patch × patch`` crop at full
resolution; its features update the state; a classifier predicts again. A sample stops at the first step whose
prediction is confident enough (the early-exit confidence rule, :mod:`dynaneural.policies.exit_rules`, one
threshold calibrated with :func:`~dynaneural.calibration.calibrate_knob`); samples that stop are not processed
further.

Training (:meth:`GFNet.loss`): cross-entropy at every step, plus the patch policy trained by REINFORCE
(:class:`~dynaneural.policies.ReinforceLoss`, moving-average baseline) with the paper's reward — the increase of
the true class's probability the chosen patch brought, ``p_t(y) − p_{t−1}(y)``. The paper uses PPO with a
continuous location and a three-stage schedule; one-stage REINFORCE over a discrete grid is used here.

Modes: train samples patch locations and runs every step for every sample; simulate takes the greedy (argmax)
locations, runs every step for every sample and then picks each sample's exit step — the reference; execute
runs step by step on a shrinking batch (samples that exit are dropped) and crops with one gather per step.
In ``all_on()`` no sample exits early and intermediate classifiers are not evaluated: the static twin is the
same network always taking T glances, :class:`StaticGlanceFocus`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import static_flops
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.layers import ConvBNAct
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import PolicySample, ReinforceLoss, create_exit_rule, sample_categorical
from dynaneural.registry import register_model
from dynaneural.validation import check_batch

__all__ = ["GFNet", "GFNetConfig", "GFNetOutput", "StaticGlance", "StaticGlanceFocus", "crop_patches", "patch_origins"]


@dataclass(frozen=True)
class GFNetConfig:
    """Args:
    in_chans, input_size, num_classes: the data. glance_scale: down-sampling of the glance (average pooling).
    patch: side of a focus crop. grid: crops start on a grid × grid lattice covering the image.
    steps: focus steps T. widths: channels of the glance and focus CNNs (one conv per entry, each after the first
    strided 2). hidden: GRU state size. threshold: confidence to stop. entropy_coef: policy entropy bonus.
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    glance_scale: int = 2
    patch: int = 14
    grid: int = 3
    steps: int = 2
    glance_widths: tuple[int, ...] = (32, 64, 128)
    focus_widths: tuple[int, ...] = (32, 64, 128)
    hidden: int = 128
    threshold: float = 0.9
    entropy_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.input_size % self.glance_scale:
            raise ValueError("glance_scale must divide input_size")
        if not 0 < self.patch <= self.input_size:
            raise ValueError(f"patch must be in (0, {self.input_size}]")
        if self.grid < 1 or (self.grid > 1 and (self.input_size - self.patch) % (self.grid - 1)):
            raise ValueError(f"grid {self.grid} must place crops of {self.patch} evenly on {self.input_size}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")

    @property
    def stride(self) -> int:
        return (self.input_size - self.patch) // (self.grid - 1) if self.grid > 1 else 1


def patch_origins(cfg: GFNetConfig, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left (row, col) in pixels of patch location indices ``loc`` (row-major on the grid)."""
    return torch.div(loc, cfg.grid, rounding_mode="floor") * cfg.stride, (loc % cfg.grid) * cfg.stride


def crop_patches(x: torch.Tensor, loc: torch.Tensor, cfg: GFNetConfig) -> torch.Tensor:
    """(B, C, H, W), locations (B,) → crops (B, C, patch, patch): one gather from the unfolded (view) lattice."""
    lattice = x.unfold(2, cfg.patch, cfg.stride).unfold(3, cfg.patch, cfg.stride)  # (B, C, g, g, P, P), a view
    rows = torch.arange(x.shape[0], device=x.device)
    return lattice[rows, :, torch.div(loc, cfg.grid, rounding_mode="floor"), loc % cfg.grid]


def _cnn(in_chans: int, widths: Sequence[int], first_stride: int) -> nn.Sequential:
    """One 3×3 conv per width, every conv after the first strided 2, then global average pooling.

    Halving the map at every conv lets three convs see the whole 14×14 glance or crop before the pooling; with a
    single late stride the pooled features were a bag of 5×5 neighbourhoods, and GFNet trailed a static net of a
    fraction of its FLOPs (BENCHMARKS.md, regions).
    """
    layers: list[nn.Module] = []
    prev = in_chans
    for i, w in enumerate(widths):
        layers.append(ConvBNAct(prev, w, stride=first_stride if i == 0 else 2))
        prev = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@dataclass
class GFNetOutput(DynamicOutput):
    """Adds ``step_logits`` (each (B, C), train/simulate) and ``policy`` (train: the sampled patch actions)."""

    step_logits: list[torch.Tensor] | None = None
    policy: list[PolicySample] | None = None


class StaticGlanceFocus(nn.Module):
    """The static twin: glance, then always T focus steps at the greedy locations, then the last classifier."""

    def __init__(self, model: GFNet) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.down, self.glance, self.focus, self.gru, self.policy_head = (model.down, model.glance, model.focus,
                                                                           model.gru, model.policy_head)
        self.head = model.heads[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gru(self.glance(self.down(x)))
        for _ in range(self.cfg.steps):
            loc = self.policy_head(h).argmax(-1)
            h = self.gru(self.focus(crop_patches(x, loc, self.cfg)), h)
        return self.head(h)


class StaticGlance(nn.Module):
    """GFNet's step 0 alone as a static classifier — down-sampling, the glance CNN, the GRU cell from a zero state and
    a linear head — built fresh from a config, to be trained on its own.

    It is the static member of GFNet's own design at the glance's cost: a benchmark that credits GFNet's focus
    steps and early exits must show them beating this network, not only a static family of another design.
    """

    def __init__(self, cfg: GFNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.down = nn.AvgPool2d(cfg.glance_scale)
        self.glance = _cnn(cfg.in_chans, cfg.glance_widths, 1)
        self.gru = nn.GRUCell(cfg.glance_widths[-1], cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, input_shape=(self.cfg.in_chans, self.cfg.input_size, self.cfg.input_size))
        return self.head(self.gru(self.glance(self.down(x))))


class GFNet(AllOnFlag, DynamicModel):
    """Glance and focus; see the module docstring."""

    def __init__(self, cfg: GFNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.down = nn.AvgPool2d(cfg.glance_scale)
        self.glance = _cnn(cfg.in_chans, cfg.glance_widths, 1)
        self.focus = _cnn(cfg.in_chans, cfg.focus_widths, 1)
        self.gru = nn.GRUCell(cfg.glance_widths[-1], cfg.hidden)
        if cfg.focus_widths[-1] != cfg.glance_widths[-1]:
            raise ValueError("glance and focus CNNs must end with the same width (they feed one GRU)")
        self.policy_head = nn.Linear(cfg.hidden, cfg.grid * cfg.grid)
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden, cfg.num_classes) for _ in range(cfg.steps + 1))
        self.reinforce = ReinforceLoss(baseline="moving_average", entropy_coef=cfg.entropy_coef)
        self.register_buffer("threshold", torch.tensor(float(cfg.threshold)))
        self.rule = create_exit_rule("confidence")
        self._all_on = False
        self._costs: dict[str, float] | None = None

    # ------------------------------------------------------------------------------------------- contract
    def to_static(self) -> StaticGlanceFocus:
        return StaticGlanceFocus(self)

    def piece_costs(self) -> dict[str, float]:
        """Static FLOPs per sample of each piece (counted once with the hook-based counter)."""
        if self._costs is None:
            p = next(self.parameters())
            x = torch.zeros(1, *self.input_shape, dtype=p.dtype, device=p.device)
            h = torch.zeros(1, self.cfg.hidden, dtype=p.dtype, device=p.device)
            with torch.no_grad():
                feat = self.glance(self.down(x))
            crop = torch.zeros(1, self.cfg.in_chans, self.cfg.patch, self.cfg.patch, dtype=p.dtype, device=p.device)
            self._costs = {"glance": static_flops(nn.Sequential(self.down, self.glance), x),
                           "focus": static_flops(self.focus, crop), "gru": static_flops(self.gru, feat),
                           "policy": static_flops(self.policy_head, h), "head": static_flops(self.heads[0], h)}
        return self._costs

    def step_cost(self, step: int, *, with_head: bool = True) -> float:
        c = self.piece_costs()
        base = c["glance"] + c["gru"] if step == 0 else c["policy"] + c["focus"] + c["gru"]
        return base + (c["head"] if with_head else 0.0)

    def static_cost(self) -> float:
        return sum(self.step_cost(s, with_head=False) for s in range(self.cfg.steps + 1)) + self.piece_costs()["head"]

    def calibrate(self, x: torch.Tensor, *, budget: float, batch_size: int = 256) -> Any:
        """Fit the confidence ``threshold`` so the mean cost on ``x`` is ``budget`` × the static twin's."""
        from dynaneural.calibration.thresholds import calibrate_knob

        old, static = float(self.threshold), self.static_cost()

        def measure(v: float) -> float:
            self.threshold.fill_(v)
            try:
                with torch.inference_mode():
                    return sum(float(self(x[i:i + batch_size], mode="execute").cost.sum())
                               for i in range(0, x.shape[0], batch_size)) / (x.shape[0] * static)
            finally:
                self.threshold.fill_(old)

        return calibrate_knob(mean_cost=measure, set_knob=lambda v: self.threshold.fill_(v), budget=budget,
                              lo=0.0, hi=1.0 + 1e-6, current=old)

    # ---------------------------------------------------------------------------------------------- loss
    def loss(self, out: GFNetOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy at every step + REINFORCE on the patch policy with reward p_t(y) − p_{t−1}(y)."""
        if out.step_logits is None:
            raise ValueError("GFNet.loss needs a train-mode output (step_logits)")
        ce = torch.stack([F.cross_entropy(z, target) for z in out.step_logits]).mean()
        parts: dict[str, torch.Tensor] = {"ce": ce.detach()}
        loss = ce
        if out.policy:
            with torch.no_grad():
                p_true = [z.softmax(-1).gather(1, target[:, None]).squeeze(1) for z in out.step_logits]
            rl = torch.stack([self.reinforce(s, p_true[t + 1] - p_true[t])["loss"] for t, s in enumerate(out.policy)])
            loss = loss + rl.mean()
            parts["policy"] = rl.mean().detach()
        return {"loss": loss, **parts}

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> GFNetOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        if mode is Mode.EXECUTE:
            return self._execute(x)
        return self._full(x, mode)

    def _full(self, x: torch.Tensor, mode: Mode) -> GFNetOutput:
        """Train / simulate: every step for every sample; simulate then picks each sample's exit step."""
        b, steps = x.shape[0], self.cfg.steps
        train = mode is Mode.TRAIN
        h = self.gru(self.glance(self.down(x)))
        logits = [self.heads[0](h)]
        locs, samples = [], []
        for t in range(1, steps + 1):
            # The policy reads the state without bending it: GFNet trains the policy with the features fixed.
            pol_logits = self.policy_head(h.detach())
            if train:
                s = sample_categorical(pol_logits)
                samples.append(s)
                loc = s.actions
            else:
                loc = pol_logits.argmax(-1)
            locs.append(loc)
            h = self.gru(self.focus(crop_patches(x, loc, self.cfg)), h)
            logits.append(self.heads[t](h))
        if train or self._all_on:
            exit_step = torch.full((b,), steps, dtype=torch.long, device=x.device)
        else:
            thr = float(self.threshold)
            exit_step = torch.full((b,), steps, dtype=torch.long, device=x.device)
            for t in range(steps - 1, -1, -1):  # the first confident step wins
                score, _ = self.rule.score(logits[t], {})
                exit_step = torch.where(score >= thr, torch.full_like(exit_step, t), exit_step)
        stacked = torch.stack(logits, 1)  # (B, T+1, C)
        out_logits = stacked.gather(1, exit_step.view(b, 1, 1).expand(b, 1, stacked.shape[-1])).squeeze(1)
        path = torch.tensor([self._path_cost(k) for k in range(steps + 1)], dtype=torch.float64, device=x.device)
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(path[exit_step])
        loc_mat = torch.stack(locs, 1)  # (B, T)
        loc_mat = torch.where(torch.arange(1, steps + 1, device=x.device) <= exit_step[:, None], loc_mat, -1)
        return GFNetOutput(logits=out_logits, cost=ledger.flops, decisions={"exit": exit_step, "patch": loc_mat},
                           mode=mode, step_logits=logits, policy=samples or None)

    def _path_cost(self, k: int) -> float:
        """FLOPs of a sample leaving after step k (every classifier up to k evaluated, unless all_on)."""
        if self._all_on:
            return self.static_cost()
        return sum(self.step_cost(s) for s in range(k + 1))

    def _execute(self, x: torch.Tensor) -> GFNetOutput:
        """Execute: step by step on the samples still running; those that are confident leave."""
        b, steps = x.shape[0], self.cfg.steps
        thr = float(self.threshold)
        ledger = CostLedger.zeros(b, device=x.device)
        out = x.new_empty(b, self.num_classes)
        exit_step = torch.full((b,), steps, dtype=torch.long, device=x.device)
        loc_mat = torch.full((b, steps), -1, dtype=torch.long, device=x.device)
        active: torch.Tensor | None = None  # None: every sample, in order
        xs = x
        h = self.gru(self.glance(self.down(xs)))
        for t in range(steps + 1):
            if t > 0:
                loc = self.policy_head(h).argmax(-1)
                if active is None:
                    loc_mat[:, t - 1] = loc
                else:
                    loc_mat[active, t - 1] = loc
                h = self.gru(self.focus(crop_patches(xs, loc, self.cfg)), h)
            last = t == steps
            if self._all_on and not last:
                ledger.charge(self.step_cost(t, with_head=False), active)
                continue
            ledger.charge(self.step_cost(t), active)
            logits = self.heads[t](h)
            if last:
                stop = torch.ones(logits.shape[0], dtype=torch.bool, device=x.device)
            else:
                stop = self.rule.score(logits, {})[0] >= thr
            n_stop = int(stop.sum())
            if n_stop == 0:
                continue
            rows = stop.nonzero().squeeze(1)
            dest = rows if active is None else active.index_select(0, rows)
            out.index_copy_(0, dest, logits.index_select(0, rows))
            exit_step.index_fill_(0, dest, t)
            if n_stop == stop.numel():
                break
            keep = (~stop).nonzero().squeeze(1)  # compaction: the confident samples are not processed further
            xs, h = xs.index_select(0, keep), h.index_select(0, keep)
            active = keep if active is None else active.index_select(0, keep)
        return GFNetOutput(logits=out, cost=ledger.flops, decisions={"exit": exit_step, "patch": loc_mat},
                           mode=Mode.EXECUTE)


def _make(defaults: dict, overrides: dict) -> GFNet:
    return GFNet(GFNetConfig(**{**defaults, **overrides}))


@register_model
def gfnet_mnist(*, steps: int = 2, threshold: float = 0.9, num_classes: int = 10) -> GFNet:
    """MNIST / Fashion-MNIST: a 14×14 glance, then up to 2 full-resolution 14×14 crops on a 3×3 grid."""
    return _make(dict(in_chans=1, input_size=28, glance_scale=2, patch=14, grid=3),
                 dict(steps=steps, threshold=threshold, num_classes=num_classes))


@register_model
def gfnet_cifar10(*, steps: int = 2, threshold: float = 0.9, num_classes: int = 10) -> GFNet:
    """CIFAR-10: a 16×16 glance, then up to 2 full-resolution 16×16 crops on a 3×3 grid."""
    return _make(dict(in_chans=3, input_size=32, glance_scale=2, patch=16, grid=3),
                 dict(steps=steps, threshold=threshold, num_classes=num_classes))


@register_model
def test_gfnet(*, steps: int = 2, num_classes: int = 5) -> GFNet:
    """Tiny variant for tests: 1×8×8 inputs, a 4×4 glance, 4×4 crops on a 3×3 grid. The threshold is set between
    the untrained classifiers' confidences on a fixed random batch, so samples exit at different steps."""
    model = _make(dict(in_chans=1, input_size=8, glance_scale=2, patch=4, grid=3, glance_widths=(4, 8),
                       focus_widths=(4, 8), hidden=8), dict(steps=steps, num_classes=num_classes))
    x = torch.randn(64, *model.input_shape, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        model.eval()
        out = model(x, mode="train")
        conf = torch.cat([z.softmax(-1).amax(-1) for z in out.step_logits[:-1]])
        model.threshold.fill_(float(conf.quantile(0.6)))
        model.train()
    return model
