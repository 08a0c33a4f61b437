"""A spatial-transformer region selector: look at a learned, per-sample window at low cost.

Paper: M. Jaderberg, K. Simonyan, A. Zisserman, K. Kavukcuoglu, "Spatial Transformer Networks", NeurIPS 2015,
arXiv:1506.02025.

A localisation network reads the image down-sampled by 2 and predicts an attention transform (Sec. 3.1's
"attention" restriction of the affine map: isotropic scale ``s`` and translation ``(t_x, t_y)``, kept inside the
image); a differentiable bilinear sampler (the grid generator and sampler, Eq. 1–5) resamples that window to a
small ``out_size × out_size`` crop; the classifier processes only the crop. The region is a per-sample decision;
the saving is structural — the classifier runs on ``out_size²`` pixels instead of ``H·W`` — so every sample pays
the same FLOPs, and what varies per sample is *where* it looks (``decisions["region"]``: (B, 3) = s, t_x, t_y).

Modes: train and execute sample with ``grid_sample``; simulate is the reference: the same crop computed by an
explicit dense interpolation matrix over the whole image (every output pixel's bilinear weights over all H·W
input pixels — slow on purpose), which checks the sampler's coordinate convention. ``all_on()`` looks at the
whole image (s = 1, t = 0) without running the localisation network: the static twin resizes the image to the
crop size and classifies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import static_flops
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import AllOnFlag, DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.layers import ConvBNAct, PooledLinearHead
from dynaneural.outputs import DynamicOutput
from dynaneural.registry import register_model
from dynaneural.validation import check_batch

__all__ = ["RegionSampler", "STNConfig", "STNSelector", "attention_theta", "dense_bilinear_crop"]


@dataclass(frozen=True)
class STNConfig:
    """Args:
    in_chans, input_size, num_classes: the data. out_size: side of the crop the classifier sees.
    min_scale: smallest window (fraction of the image side). loc_widths, widths: channels of the localisation
    network and of the classifier.
    """

    in_chans: int = 1
    input_size: int = 28
    num_classes: int = 10
    out_size: int = 14
    min_scale: float = 0.3
    loc_widths: tuple[int, ...] = (8, 16)
    widths: tuple[int, ...] = (32, 64)

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must lie in (0, 1], got {self.min_scale}")
        if not 0 < self.out_size <= self.input_size:
            raise ValueError("out_size must lie in (0, input_size]")


def attention_theta(params: torch.Tensor) -> torch.Tensor:
    """(B, 3) = (s, t_x, t_y) → affine matrices (B, 2, 3) ``[[s, 0, t_x], [0, s, t_y]]``."""
    s, tx, ty = params.unbind(-1)
    zero = torch.zeros_like(s)
    return torch.stack([torch.stack([s, zero, tx], -1), torch.stack([zero, s, ty], -1)], 1)


class RegionSampler(nn.Module):
    """Bilinear sampling of a window given by ``params`` (B, 3) to ``out_size²`` pixels (``grid_sample``,
    ``align_corners=False``, zero padding). Costs 4 MACs per output value (its own ``flops`` for the counter)."""

    def __init__(self, out_size: int) -> None:
        super().__init__()
        self.out_size = out_size

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        grid = F.affine_grid(attention_theta(params), [b, c, self.out_size, self.out_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def flops(self, inputs: tuple[Any, ...], output: Any) -> float:
        return float(4 * output.numel())


def dense_bilinear_crop(x: torch.Tensor, params: torch.Tensor, out_size: int) -> torch.Tensor:
    """Reference crop: build each sample's (P², H·W) bilinear interpolation matrix explicitly and multiply."""
    b, c, hgt, wid = x.shape
    grid = F.affine_grid(attention_theta(params), [b, c, out_size, out_size], align_corners=False)  # (B, P, P, 2)
    gx = ((grid[..., 0] + 1) * wid - 1) / 2  # pixel coordinates (align_corners=False)
    gy = ((grid[..., 1] + 1) * hgt - 1) / 2
    x0, y0 = gx.floor(), gy.floor()
    mat = x.new_zeros(b, out_size * out_size, hgt * wid)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (gx - xi).abs()) * (1 - (gy - yi).abs())
            inside = (xi >= 0) & (xi < wid) & (yi >= 0) & (yi < hgt)
            idx = (yi.clamp(0, hgt - 1) * wid + xi.clamp(0, wid - 1)).long().view(b, -1, 1)
            mat.scatter_add_(2, idx, (w * inside).view(b, -1, 1))
    out = mat @ x.reshape(b, c, hgt * wid).transpose(1, 2)  # (B, P², C)
    return out.transpose(1, 2).reshape(b, c, out_size, out_size)


class _Static(nn.Module):
    def __init__(self, sampler: RegionSampler, classifier: nn.Module) -> None:
        super().__init__()
        self.sampler, self.classifier = sampler, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ident = x.new_tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)
        return self.classifier(self.sampler(x, ident))


class STNSelector(AllOnFlag, DynamicModel):
    """Spatial-transformer region selector; see the module docstring."""

    def __init__(self, cfg: STNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
        self.num_classes = cfg.num_classes
        layers: list[nn.Module] = [nn.AvgPool2d(2)]
        prev = cfg.in_chans
        for w in cfg.loc_widths:
            layers.append(ConvBNAct(prev, w, stride=2))
            prev = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, 3)]
        self.loc = nn.Sequential(*layers)
        nn.init.zeros_(self.loc[-1].weight)  # start at the whole image, as the paper initialises to the identity
        nn.init.zeros_(self.loc[-1].bias)
        self.sampler = RegionSampler(cfg.out_size)
        cls: list[nn.Module] = []
        prev = cfg.in_chans
        for i, w in enumerate(cfg.widths):
            cls.append(ConvBNAct(prev, w, stride=1 if i == 0 else 2))
            prev = w
        self.classifier = nn.Sequential(*cls, PooledLinearHead(prev, cfg.num_classes))
        self._all_on = False
        self._costs: dict[str, float] | None = None

    def to_static(self) -> nn.Module:
        return _Static(self.sampler, self.classifier)

    def region(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3) window (s, t_x, t_y): scale in [min_scale, 1], translation keeping the window inside."""
        raw = self.loc(x)
        s = self.cfg.min_scale + (1 - self.cfg.min_scale) * torch.sigmoid(raw[:, 0] + 4.0)  # ≈ 1 at the start
        t = torch.tanh(raw[:, 1:]) * (1 - s).unsqueeze(-1)
        return torch.cat([s.unsqueeze(-1), t], -1)

    def piece_costs(self) -> dict[str, float]:
        if self._costs is None:
            p = next(self.parameters())
            x = torch.zeros(1, *self.input_shape, dtype=p.dtype, device=p.device)
            crop = torch.zeros(1, self.cfg.in_chans, self.cfg.out_size, self.cfg.out_size, dtype=p.dtype,
                               device=p.device)
            self._costs = {"loc": static_flops(self.loc, x), "classifier": static_flops(self.classifier, crop),
                           "sampler": float(4 * crop.numel())}
        return self._costs

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> DynamicOutput:
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        c = self.piece_costs()
        ledger = CostLedger.zeros(b, device=x.device)
        ledger.charge(c["sampler"] + c["classifier"])
        if self._all_on:
            params = x.new_tensor([1.0, 0.0, 0.0]).expand(b, 3)
        else:
            params = self.region(x)
            ledger.charge(c["loc"])
        crop = dense_bilinear_crop(x, params, self.cfg.out_size) if mode is Mode.SIMULATE else self.sampler(x, params)
        return DynamicOutput(logits=self.classifier(crop), cost=ledger.flops, decisions={"region": params}, mode=mode)


@register_model
def stn_mnist(*, out_size: int = 14, min_scale: float = 0.3, num_classes: int = 10) -> STNSelector:
    """MNIST / Fashion-MNIST: the classifier sees a 14×14 window chosen from the 28×28 image."""
    return STNSelector(STNConfig(in_chans=1, input_size=28, out_size=out_size, min_scale=min_scale,
                                 num_classes=num_classes))


@register_model
def test_stn(*, out_size: int = 4, num_classes: int = 5) -> STNSelector:
    """Tiny variant for tests: 1×8×8 inputs, 4×4 crops; the localisation head is randomised so windows differ."""
    model = STNSelector(STNConfig(in_chans=1, input_size=8, out_size=out_size, loc_widths=(4,), widths=(4, 8),
                                  num_classes=num_classes))
    with torch.no_grad():
        nn.init.normal_(model.loc[-1].weight, std=2.0)
        model.loc[-1].bias.copy_(torch.tensor([-4.0, 0.0, 0.0]))
    return model
