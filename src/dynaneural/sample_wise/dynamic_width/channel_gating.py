"""Per-sample channel gating: a saliency predictor keeps the top channels of each layer for each sample (FBS).

Paper: X. Gao, Y. Zhao, Ł. Dudziak, R. Mullins, C.-Z. Xu, "Dynamic Channel Pruning: Feature Boosting and
Suppression", ICLR 2019, arXiv:1810.05331.

Every gated convolution ``l`` has a saliency predictor ``s_l = W_l · gap(x_{l-1}) + b_l`` (one logit per output
channel, read from the global-average-pooled input of the layer) and keeps, for each sample, its top
``k_l = round(keep_l · C_l)`` channels (FBS's winner-take-all, Eq. 4). A channel that is off is never computed,
*and* the next layer never reads it, so a layer with ``k_in`` of its inputs and ``k_out`` of its outputs on costs
``k_in · k_out · kh · kw · H' · W'``: the saving compounds across layers (FBS, Sec. 3.3).

One deliberate difference from FBS: FBS multiplies the kept channels by their saliency (feature *boosting*);
here the gate is binary at inference and its training gradient is straight-through through ``sigmoid(s)``
(Bengio et al., 2013), so that "every channel on" is exactly the plain CNN with the same weights (the static
twin) and the predictor is the only overhead.

Modes:

* ``train`` — the full convolution of every layer is computed and multiplied by the straight-through mask;
* ``simulate`` — the reference: full convolutions, hard top-k masks (zeros in the pruned channels);
* ``execute`` — every sample keeps a compact (B, k, H, W) tensor of its kept channels and their channel indices;
  a layer gathers, per sample, the kept-rows × kept-columns slice of its (BN-folded) kernel,
  ``W[out_idx_b][:, in_idx_b]``, and runs all samples as one grouped convolution (batch folded into groups, see
  ``dynamic_params.functional.per_sample_conv2d``); the predictor and the classifier likewise read only the
  kept input columns (a batched matmul). Nothing of a pruned channel is computed.

Cost (analytic, the FLOPs counter's convention; identical in simulate and execute): per gated layer, the
predictor (``k_in·H·W`` for the pooling, ``k_in·C_out`` for the linear map) plus the convolution
``k_in·k_out·kh·kw·H'·W'`` plus batch norm ``2·k_out·H'·W'``; the head ``k·H·W + k·classes``. Because ``k`` is
fixed per layer every sample pays the same FLOPs; *which* channels run differs per sample (``decisions``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import straight_through
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.functional import FoldedBN, conv_output_size, per_sample_conv2d
from dynaneural.validation import check_batch

__all__ = ["ChannelGatedCNN", "ChannelGatingConfig", "GatedConv"]


@dataclass(frozen=True)
class ChannelGatingConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths: output channels of each 3×3 conv layer. strides: stride of each layer.
    keep: fraction of each layer's output channels kept per sample (1.0 = the layer is not gated).
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2)
    keep: tuple[float, ...] = (1.0, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not (len(self.widths) == len(self.strides) == len(self.keep)):
            raise ValueError(f"widths {self.widths}, strides {self.strides} and keep {self.keep} must have the "
                             "same length")
        if any(not 0.0 < k <= 1.0 for k in self.keep):
            raise ValueError(f"keep fractions must lie in (0, 1], got {self.keep}")


class GatedConv(nn.Module):
    """3×3 conv → BN → ReLU whose output channels are gated per sample by a saliency predictor.

    Args:
        in_chs, out_chs: channels. stride: conv stride. in_size: input height = width (for the cost).
        keep: fraction of output channels kept per sample; 1.0 builds no predictor (ungated layer).
    """

    def __init__(self, in_chs: int, out_chs: int, *, stride: int, in_size: int, keep: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.folded = FoldedBN()  # conv + BN folded once for execute mode
        self.predictor = nn.Linear(in_chs, out_chs) if keep < 1.0 else None
        if self.predictor is not None:
            # A zero bias lets the input, not a fixed channel preference, decide the ranking from the start.
            nn.init.zeros_(self.predictor.bias)
        self.in_size = in_size
        self.out_size = conv_output_size(in_size, kernel_size=3, stride=stride, padding=1)
        self.k_out = out_chs
        self.set_keep(keep)

    def set_keep(self, keep: float) -> None:
        """Change the kept fraction (FBS lets the density change at inference); ungated layers stay at 1."""
        if self.predictor is None:
            return
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {keep}")
        self.k_out = max(1, round(keep * self.conv.out_channels))

    @property
    def gated(self) -> bool:
        return self.predictor is not None

    # ---- analytic cost (per sample), the FLOPs counter's convention
    def conv_cost(self, k_in: int, k_out: int) -> float:
        hw = self.out_size * self.out_size
        return float(k_in * k_out * 9 * hw + 2 * k_out * hw)  # conv MACs + batch norm (scale, shift)

    def predictor_cost(self, k_in: int) -> float:
        return float(k_in * self.in_size * self.in_size + k_in * self.conv.out_channels)  # pooling + linear

    def top_k(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, k_out) indices of the kept channels, sorted ascending (contiguous-ish gathers)."""
        return logits.topk(self.k_out, dim=1).indices.sort(dim=1).values


class ChannelGatedCNN(AllOnFlag, DynamicModel):
    """A plain CNN (3×3 conv-BN-ReLU layers, global pooling, linear classifier) with FBS channel gates.

    Decisions: ``gate{l}`` — (B, C_l) bool, the channels layer ``l`` computed for each sample.
    """

    def __init__(self, cfg: ChannelGatingConfig) -> None:
        super().__init__()
        self.config = asdict(cfg)
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        layers, prev, size = [], cfg.in_chans, cfg.input_size
        for w, s, k in zip(cfg.widths, cfg.strides, cfg.keep, strict=True):
            layers.append(GatedConv(prev, w, stride=s, in_size=size, keep=k))
            prev, size = w, layers[-1].out_size
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(prev, cfg.num_classes)
        self.final_size = size
        self._all_on = False

    # ------------------------------------------------------------------ contract
    def to_static(self) -> nn.Module:
        """The plain CNN: conv-BN-ReLU layers, global average pooling, the linear head (same weights)."""
        body = [nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn), nn.ReLU()) for m in self.layers]
        return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), copy.deepcopy(self.head))

    def set_keep(self, keep: float) -> None:
        """Set the kept fraction of every gated layer (an inference-time accuracy/FLOPs knob)."""
        for m in self.layers:
            m.set_keep(keep)

    def head_cost(self, k: int) -> float:
        return float(k * self.final_size * self.final_size + k * self.num_classes)

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        ledger = CostLedger.zeros(x.shape[0], device=x.device)
        if mode is Mode.EXECUTE:
            logits, decisions = self._execute(x, ledger)
        else:
            logits, decisions = self._dense(x, ledger, train=mode is Mode.TRAIN)
        return DynamicOutput(logits=logits, cost=ledger.flops, decisions=decisions, mode=mode)

    # ------------------------------------------------------------------ train / simulate: full compute + masks
    def _dense(self, x: torch.Tensor, ledger: CostLedger, *, train: bool
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h, k_in, decisions = x, x.shape[1], {}
        for i, layer in enumerate(self.layers):
            gated = layer.gated and not self._all_on
            if gated:
                assert layer.predictor is not None
                s = layer.predictor(h.mean((2, 3)))  # (B, C_out) saliency logits from the (masked) input
                ledger.charge(layer.predictor_cost(k_in), part=f"predictor{i}")
                hard = torch.zeros_like(s, dtype=torch.bool).scatter_(1, layer.top_k(s), True)
                gate = straight_through(hard, torch.sigmoid(s)) if train else hard.to(h.dtype)
                decisions[f"gate{i}"] = hard
            k_out = layer.k_out if gated else layer.conv.out_channels
            h = F.relu(layer.bn(layer.conv(h)))
            ledger.charge(layer.conv_cost(k_in, k_out), part=f"conv{i}")
            if gated:
                h = h * gate[:, :, None, None]
            k_in = k_out
        ledger.charge(self.head_cost(k_in), part="head")
        return self.head(h.mean((2, 3))), decisions

    # ------------------------------------------------------------------ execute: only the kept channels
    def _execute(self, x: torch.Tensor, ledger: CostLedger) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = x  # (B, k_in, H, W): only the kept channels of the previous layer, whose indices are `idx`
        idx: torch.Tensor | None = None  # (B, k_in) channel indices, None = every channel
        decisions: dict[str, torch.Tensor] = {}
        b = x.shape[0]
        for i, layer in enumerate(self.layers):
            gated = layer.gated and not self._all_on
            k_in = h.shape[1]
            out_idx: torch.Tensor | None = None
            if gated:
                assert layer.predictor is not None
                pooled = h.mean((2, 3))  # (B, k_in)
                if idx is None:
                    s = layer.predictor(pooled)
                else:  # only the kept input columns of the predictor: (B, 1, k_in) @ (B, k_in, C_out)
                    s = torch.bmm(pooled.unsqueeze(1), layer.predictor.weight.t()[idx]).squeeze(1)
                    s = s + layer.predictor.bias
                ledger.charge(layer.predictor_cost(k_in), part=f"predictor{i}")
                out_idx = layer.top_k(s)  # (B, k_out)
                decisions[f"gate{i}"] = torch.zeros_like(s, dtype=torch.bool).scatter_(1, out_idx, True)
            w, bias = layer.folded(0, layer.conv.weight, layer.bn)  # (C_out, C_in, 3, 3), (C_out,)
            conv_kw = dict(stride=layer.conv.stride[0], padding=1)
            if out_idx is None and idx is None:
                h = F.relu(F.conv2d(h, w, bias, **conv_kw))  # type: ignore[arg-type]
            else:
                if out_idx is not None and idx is not None:
                    wb = w[out_idx[:, :, None], idx[:, None, :]]  # (B, k_out, k_in, 3, 3)
                elif out_idx is not None:
                    wb = w[out_idx]  # (B, k_out, C_in, 3, 3)
                else:
                    assert idx is not None
                    wb = w[:, idx].transpose(0, 1)  # (C_out, B, k_in, 3, 3) → (B, C_out, k_in, 3, 3)
                bb = bias[out_idx] if out_idx is not None else bias.expand(b, -1)
                h = F.relu(per_sample_conv2d(h, wb, bb, **conv_kw))  # type: ignore[arg-type]
            ledger.charge(layer.conv_cost(k_in, h.shape[1]), part=f"conv{i}")
            idx = out_idx
        pooled = h.mean((2, 3))  # (B, k)
        if idx is None:
            logits = self.head(pooled)
        else:
            logits = torch.bmm(pooled.unsqueeze(1), self.head.weight.t()[idx]).squeeze(1) + self.head.bias
        ledger.charge(self.head_cost(h.shape[1]), part="head")
        return logits, decisions


def _make(defaults: dict, overrides: dict) -> ChannelGatedCNN:
    return ChannelGatedCNN(ChannelGatingConfig(**{**defaults, **overrides}))


@register_model
def channel_gating_mnist(*, keep: float = 0.5, num_classes: int = 10) -> ChannelGatedCNN:
    """28×28 MNIST: 3 conv layers (32, 64, 128 channels; strides 1, 2, 2), layers 2–3 gated at ``keep``."""
    return _make(dict(in_chans=1, input_size=28), dict(keep=(1.0, keep, keep), num_classes=num_classes))


@register_model
def channel_gating_cifar10(*, keep: float = 0.5, num_classes: int = 10) -> ChannelGatedCNN:
    """32×32 CIFAR-10: 4 conv layers (32, 64, 128, 128; strides 1, 2, 2, 1), layers 2–4 gated at ``keep``."""
    return _make(dict(in_chans=3, input_size=32, widths=(32, 64, 128, 128), strides=(1, 2, 2, 1)),
                 dict(keep=(1.0, keep, keep, keep), num_classes=num_classes))


@register_model
def test_channel_gating(*, keep: float = 0.5, num_classes: int = 10) -> ChannelGatedCNN:
    """Tiny variant for tests: 1×8×8 inputs, 3 layers (4, 8, 8), all gated."""
    return _make(dict(in_chans=1, input_size=8, widths=(4, 8, 8), strides=(1, 2, 1)),
                 dict(keep=(keep, keep, keep), num_classes=num_classes))
