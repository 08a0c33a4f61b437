"""DynConv: residual blocks whose spatial gate skips the inactive positions.

Paper: T. Verelst, T. Tuytelaars, "Dynamic Convolutions: Exploiting Spatial Sparsity for Faster Inference",
CVPR 2020, arXiv:1912.03203.

Every gated residual block predicts a mask over its output positions with a 1×1 convolution of its input
(strided like the block), and computes its residual branch only where the mask is on:
``y = relu(shortcut(x) + m ⊙ F(x))``. Modes:

* ``train`` — ``m`` is a straight-through Gumbel-sigmoid sample (``policies.gumbel_sigmoid``, τ from a
  schedule; the paper keeps τ = 1), or with ``relaxation="straight_through"`` the deterministic inference mask
  with sigmoid gradients (our option: noisy training masks leave batch-norm statistics and weights fitted to masks
  inference never runs); everything is computed and multiplied by ``m``; the *sparsity loss* pulls the
  network's expected FLOPs — with DynConv's mask dilation for the first convolution, by max-pooling the relaxed
  mask — to a target fraction (``policies.BudgetLoss``, the paper's network-level term);
* ``simulate`` — hard masks ``sigmoid(logit) >= threshold``, everything computed, masked (the reference);
* ``execute`` — the same masks; each gated block runs ``conv1`` at the dilated mask and ``conv2`` at the mask
  only, by gathering 3×3 neighbourhoods of the active positions from NHWC feature maps into one matrix
  multiply and scattering back (``sparse_conv.py``). Inactive positions are never computed.

The ledger charges each sample the FLOPs of its own active positions (dilated for ``conv1``) plus the gates and
the dense parts (stem, projection shortcuts, head). ``threshold`` is the knob ``calibrate_knob`` moves to meet a
budget after training. Differences from the paper: the paper's per-layer sparsity bounds (an annealed
curriculum) are not used — the network-level budget term is; the paper initialises from a pretrained ResNet,
which :meth:`DynConvResNet.load_static` supports (the CIFAR bench does it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import BudgetLoss, TemperatureSchedule, binary_decision
from dynaneural.registry import register_model
from dynaneural.spatial_wise.pixel._resnet import BasicBlock, ResNetCifar
from dynaneural.validation import check_batch

__all__ = ["DynConvConfig", "DynConvResNet", "SpatialMaskOutput"]


@dataclass
class SpatialMaskOutput(DynamicOutput):
    """Output of a spatially gated network.

    Attributes:
        masks: the hard mask of every gated block, each (B, H_l, W_l) bool (execute positions), in block order.
    """

    masks: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class DynConvConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths, depths, strides: the ResNet stages (see ``_resnet.ResNetCifar``).
    gate_strided: also gate the first (down-sampling) block of each stage; its projection shortcut stays dense.
    budget: target fraction of the full network's FLOPs for the sparsity loss. budget_weight: its weight.
    tau_start, tau_end: Gumbel temperature schedule (exponential) over training.
    threshold: inference gate threshold on sigmoid(logit) (the calibration knob).
    gate_bias: initial gate bias (positive: start with most positions on, as from a pretrained network).
    relaxation: how train mode relaxes the gates: ``gumbel`` (the paper: straight-through Gumbel-sigmoid, so
        training masks are noisy) or ``straight_through`` (the deterministic inference mask at ``threshold`` in the
        forward pass, sigmoid gradients: training runs exactly the masks inference will run, and the sparsity
        loss acts on those decisions).
    """

    in_chans: int = 3
    input_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (3, 3, 3)
    strides: tuple[int, ...] = (1, 2, 2)
    gate_strided: bool = True
    budget: float = 0.5
    budget_weight: float = 10.0
    tau_start: float = 1.0
    tau_end: float = 1.0
    threshold: float = 0.5
    gate_bias: float = 0.0
    relaxation: str = "gumbel"

    def __post_init__(self) -> None:
        if self.relaxation not in ("gumbel", "straight_through"):
            raise ValueError(f"relaxation must be 'gumbel' or 'straight_through', got {self.relaxation!r}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.input_size % (2 ** sum(s == 2 for s in self.strides)):
            raise ValueError(f"input_size {self.input_size} must be divisible by the total stride")


class DynConvResNet(AllOnFlag, DynamicModel):
    """A CIFAR ResNet whose residual blocks compute only at the positions their spatial gate selects."""

    def __init__(self, cfg: DynConvConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        self.net = ResNetCifar(in_chans=cfg.in_chans, num_classes=cfg.num_classes, widths=cfg.widths,
                               depths=cfg.depths, strides=cfg.strides)
        # Analytic per-sample FLOPs of the fixed parts and per-block output sizes (from the static shapes).
        size = cfg.input_size
        self.out_hw: list[int] = []
        for blk in self.net.blocks:
            size //= blk.stride
            self.out_hw.append(size)
        self.gates = nn.ModuleList(
            self._make_gate(i, blk) if blk.stride == 1 or cfg.gate_strided else nn.Identity()
            for i, blk in enumerate(self.net.blocks))
        self.budget_loss = BudgetLoss(target=cfg.budget, weight=cfg.budget_weight)
        self.tau_schedule = TemperatureSchedule(start=cfg.tau_start, end=cfg.tau_end,
                                                kind="constant" if cfg.tau_start == cfg.tau_end else "exponential")
        self.tau = cfg.tau_start
        self.threshold = cfg.threshold
        self._all_on = False
        w0 = cfg.widths[0]
        self.stem_flops = float((cfg.in_chans * 9 * w0 + 2 * w0) * cfg.input_size ** 2)
        c_last = cfg.widths[-1]
        self.head_flops = float(c_last * size * size + c_last * cfg.num_classes)
        self.static_total = self.stem_flops + self.head_flops + sum(
            blk.dense_cost(s, s) for blk, s in zip(self.net.blocks, self.out_hw, strict=True))

    # --------------------------------------------------------------------------------------- contract
    def to_static(self) -> nn.Module:
        return copy.deepcopy(self.net)

    def load_static(self, static: nn.Module) -> None:
        """Initialise the network from a trained static twin (DynConv fine-tunes a pretrained ResNet)."""
        self.net.load_state_dict(static.state_dict())

    def set_train_progress(self, progress: float) -> None:
        self.tau = self.tau_schedule(progress)

    def _make_gate(self, index: int, blk: BasicBlock) -> nn.Module:
        """DynConv's mask unit: a 1×1 convolution of the block input, strided like the block → one logit per
        output position."""
        g = nn.Conv2d(blk.conv1.in_channels, 1, 1, stride=blk.stride)
        nn.init.normal_(g.weight, std=0.5 / blk.conv1.in_channels ** 0.5)
        nn.init.constant_(g.bias, self.cfg.gate_bias)
        return g

    def gate_flops(self, index: int) -> float:
        g = self.gates[index]
        if not isinstance(g, nn.Conv2d):
            return 0.0
        return float(g.in_channels * self.out_hw[index] ** 2)

    def _run_block(self, i: int, h: torch.Tensor, mode: Mode
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gate and run gated block ``i``: (output, hard pixel mask (B, H, W), per-sample FLOPs charged (B,),
        differentiable expected FLOPs (B,) in train mode else None)."""
        blk = self.net.blocks[i]
        d = binary_decision(self.gates[i](h)[:, 0], training=mode is Mode.TRAIN, relaxation=self.cfg.relaxation,
                            tau=self.tau,
                            threshold=self.threshold)  # (B, H_out, W_out)
        if mode is Mode.EXECUTE:
            out = blk.masked_execute(h, d.hard, inplace=True)
        else:
            out = blk.masked_dense(h, d.value if mode is Mode.TRAIN else d.hard)
        cost = self.gate_flops(i) + blk.position_costs(d.hard)
        expected = self.gate_flops(i) + blk.expected_position_costs(d.value) if mode is Mode.TRAIN else None
        return out, d.hard, cost, expected

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> SpatialMaskOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        if mode is Mode.EXECUTE:
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC rows for the gathers
        h = self.net.stem(x)
        ledger.charge(self.stem_flops + self.head_flops)
        expected = torch.full((b,), self.stem_flops + self.head_flops, dtype=h.dtype, device=h.device)
        masks: list[torch.Tensor] = []
        active = torch.zeros(b, dtype=torch.float64, device=x.device)
        total = 0
        for i, (blk, gate) in enumerate(zip(self.net.blocks, self.gates, strict=True)):
            s = self.out_hw[i]
            if self._all_on or isinstance(gate, nn.Identity):
                h = blk(h)
                ledger.charge(blk.dense_cost(s, s))
                expected = expected + blk.dense_cost(s, s)
                continue
            h, hard, cost, exp_cost = self._run_block(i, h, mode)
            ledger.charge(cost, part=f"block{i}")
            if exp_cost is not None:
                expected = expected + exp_cost
            masks.append(hard)
            active += hard.flatten(1).sum(1, dtype=torch.float64)
            total += s * s
        logits = self.net.head(h)
        aux = {"budget": self.budget_loss(expected, self.static_total)} if mode is Mode.TRAIN and total else {}
        frac = active / total if total else torch.ones(b, dtype=torch.float64, device=x.device)
        return SpatialMaskOutput(logits=logits, cost=ledger.flops, decisions={"active_fraction": frac}, mode=mode,
                                 aux_losses=aux, masks=masks)


def _make(defaults: dict, overrides: dict) -> DynConvResNet:
    return DynConvResNet(DynConvConfig(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}}))


@register_model
def dynconv_resnet20_cifar(*, num_classes: int = 10, budget: float = 0.5, budget_weight: float = 10.0,
                           threshold: float = 0.5, gate_bias: float = 0.0, relaxation: str = "gumbel"
                           ) -> DynConvResNet:
    """ResNet-20 (16, 32, 64 channels; 3 blocks per stage) on 3×32×32, every block gated (≈41 MFLOPs dense)."""
    return _make({}, dict(num_classes=num_classes, budget=budget, budget_weight=budget_weight, threshold=threshold,
                          gate_bias=gate_bias, relaxation=relaxation))


@register_model
def dynconv_resnet_wide_cifar(*, num_classes: int = 10, budget: float = 0.5, budget_weight: float = 10.0,
                              threshold: float = 0.5, gate_bias: float = 0.0) -> DynConvResNet:
    """A wider, shallower CIFAR ResNet (64, 128, 256 channels; 2 blocks per stage), every block gated.

    Wider maps amortise the gather/scatter overhead of sparse execution on CPU (see BENCHMARKS.md, spatial pixel level).
    """
    return _make(dict(widths=(64, 128, 256), depths=(2, 2, 2)),
                 dict(num_classes=num_classes, budget=budget, budget_weight=budget_weight, threshold=threshold,
                      gate_bias=gate_bias))


@register_model
def test_dynconv(*, num_classes: int = 10) -> DynConvResNet:
    """Tiny variant for tests: 3×8×8 inputs, 2 stages (8, 16 channels), about half the positions active."""
    return DynConvResNet(DynConvConfig(in_chans=3, input_size=8, num_classes=num_classes, widths=(8, 16),
                                       depths=(2, 1), strides=(1, 2)))

