"""The small CNN the dynamic-parameter methods plug their layers into (shared so the comparison is fair).

``stem`` (a static 3×3 conv-BN-ReLU) → ``L`` layers → global average pooling → linear classifier. Each method file
(CondConv, dynamic convolution, hypernetwork, squeeze-excitation) supplies the layers; :func:`build_static_convnet`
builds the *static* network of the same architecture (plain conv-BN-ReLU layers), the baseline the papers compare
with at (nearly) equal FLOPs.

A dynamic layer is an ``nn.Module`` with ``forward(x, *, mode) -> (y, decision)`` — ``y`` the activated output
(B, C', H', W'), ``decision`` a (B,) int64 summary of the input-dependent choice (e.g. the kernel with the largest
attention) — and ``cost() -> float``, its analytic FLOPs per sample (routing / attention / weight generation
included). The same modules carry FLOPs-counter rules, so ``compute.count_flops`` on the model cross-checks the
ledger.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.layers import ConvBNAct
from dynaneural.outputs import DynamicOutput
from dynaneural.sample_wise.dynamic_params.functional import conv_output_size
from dynaneural.validation import check_batch

__all__ = ["ConvNetConfig", "ParamConvNet", "build_static_convnet", "dataset_config"]


@dataclass(frozen=True)
class ConvNetConfig:
    """Args:
    in_chans: input channels. input_size: input height = width. num_classes: classes.
    widths: output channels of the stem (first) and of each dynamic layer. strides: their strides.
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.strides) or len(self.widths) < 2:
            raise ValueError(f"widths {self.widths} and strides {self.strides} must have the same length >= 2")

    def sizes(self) -> list[int]:
        """Input height of every layer, then the final height."""
        out = [self.input_size]
        for s in self.strides:
            out.append(conv_output_size(out[-1], kernel_size=3, stride=s, padding=1))
        return out


_DATASET_LAYOUTS = {  # (in_chans, input_size, default widths, strides)
    "mnist": (1, 28, (32, 64, 128), (1, 2, 2)),
    "cifar10": (3, 32, (32, 64, 128, 128), (1, 2, 2, 1)),
}


def dataset_config(dataset: str, *, num_classes: int = 10, widths: tuple[int, ...] | list[int] | None = None
                   ) -> ConvNetConfig:
    """The backbone layout the ``*_mnist`` / ``*_cifar10`` factories share: 28×28×1 with strides 1-2-2 (default
    widths 32-64-128) or 32×32×3 with strides 1-2-2-1 (default 32-64-128-128). ``widths`` changes the channels
    (one per layer: the stem's, then each dynamic layer's), e.g. a narrow network where capacity is scarce."""
    if dataset not in _DATASET_LAYOUTS:
        raise ValueError(f"unknown dataset layout {dataset!r}; known: {sorted(_DATASET_LAYOUTS)}")
    in_chans, size, default, strides = _DATASET_LAYOUTS[dataset]
    w = tuple(int(c) for c in (default if widths is None else widths))
    if len(w) != len(strides) or min(w) < 1:
        raise ValueError(f"{dataset}: widths must be {len(strides)} positive channel counts, got {widths}")
    return ConvNetConfig(in_chans=in_chans, input_size=size, num_classes=num_classes, widths=w, strides=strides)


LayerFactory = Callable[..., nn.Module]  # (in_chs=, out_chs=, stride=, in_size=) -> dynamic layer


class ParamConvNet(DynamicModel):
    """Stem → dynamic layers → pooled linear head; decisions ``layer{i}`` = each layer's (B,) summary.

    ``has_static_twin`` is False: the input-specific parameters have no fixed-weight equivalent (every kernel
    always contributes, so ``all_on`` changes nothing). The static network of the same architecture, trained on
    its own, is the comparison (:func:`build_static_convnet`).
    """

    has_static_twin = False

    def __init__(self, cfg: ConvNetConfig, make_layer: LayerFactory, *, method: str) -> None:
        super().__init__()
        self.config = {**asdict(cfg), "method": method}
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        sizes = cfg.sizes()
        self.stem = ConvBNAct(cfg.in_chans, cfg.widths[0], stride=cfg.strides[0])
        hw = sizes[1] ** 2
        self.stem_cost = float(cfg.in_chans * cfg.widths[0] * 9 * hw + 2 * cfg.widths[0] * hw)
        self.layers = nn.ModuleList(
            make_layer(in_chs=cfg.widths[i - 1], out_chs=cfg.widths[i], stride=cfg.strides[i], in_size=sizes[i])
            for i in range(1, len(cfg.widths)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)
        self.head_cost = float(cfg.widths[-1] * (sizes[-1] ** 2 + cfg.num_classes))

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Every kernel of every layer always contributes: nothing to switch on."""
        yield

    def set_train_progress(self, progress: float) -> None:
        for m in self.layers:
            fn = getattr(m, "set_train_progress", None)
            if callable(fn):
                fn(progress)

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        ledger = CostLedger.zeros(x.shape[0], device=x.device)
        h = self.stem(x)
        ledger.charge(self.stem_cost, part="stem")
        decisions: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h, decisions[f"layer{i}"] = layer(h, mode=mode)
            ledger.charge(layer.cost(), part=f"layer{i}")
        logits = self.head(self.pool(h).flatten(1))
        ledger.charge(self.head_cost, part="head")
        return DynamicOutput(logits=logits, cost=ledger.flops, decisions=decisions, mode=mode)


def build_static_convnet(cfg: ConvNetConfig) -> nn.Sequential:
    """The static network of the same architecture: conv-BN-ReLU layers, global pooling, linear head."""
    chans = (cfg.in_chans, *cfg.widths)
    body = [ConvBNAct(chans[i], chans[i + 1], stride=s) for i, s in enumerate(cfg.strides)]
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.widths[-1], cfg.num_classes))
