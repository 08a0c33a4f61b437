"""A hypernetwork that predicts a convolution's kernel from the input (dynamic, input-conditioned weights).

Papers: D. Ha, A. Dai, Q. V. Le, "HyperNetworks", ICLR 2017, arXiv:1609.09106 (a two-layer hypernetwork that
generates a layer's kernel chunk by chunk from per-chunk embeddings, Sec. 3.1, and its dynamic, input-
conditioned form, Sec. 3.2); B. De Brabandere, X. Jia, T. Tuytelaars, L. Van Gool, "Dynamic Filter Networks",
NeurIPS 2016, arXiv:1605.09673 (filters generated per sample from the input).

The kernel of a layer is split into ``J = Co / chunk`` chunks of ``chunk`` output channels. Chunk ``j`` of sample
``b`` is generated as in Ha et al. (Eq. 2–3), with an input-conditioned embedding:

    z_bj = e_j + P · GAP(x_b)            (B, J, d)   a learned layer embedding shifted by the input
    a_bj = W_in z_bj + b_in              (B, J, d)
    K_bj = W_out a_bj + b_out            (B, J, chunk·Ci·kh·kw)

and the layer computes ``ReLU(BN(K_b * x_b))``.

Modes (no discrete decision; ``decisions["layer{i}"]`` is the argmax of the input code ``P · GAP(x_b)``):

* ``simulate`` — the definition by linearity: ``K_bj * x = Σ_m a_bjm (W_out[m] * x) + b_out * x``, so the
  ``d + 1`` basis kernels are convolved with the input (shared by every chunk) and the outputs mixed with
  ``[a_bj, 1]`` — no per-sample kernel is ever formed;
* ``execute``/``train`` — generate every sample's kernel and run one grouped convolution (batch folded into
  groups).

They agree to float rounding. The ledger charges the execute path: pooling ``Ci·H·W``, the input projection
``Ci·d``, ``J·d²`` for ``W_in``, ``J·d·chunk·Ci·kh·kw = d·Co·Ci·kh·kw`` for ``W_out``, the convolution and
batch norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.flops import register_flops_rule
from dynaneural.execution import Mode
from dynaneural.registry import register_model
from dynaneural.sample_wise.dynamic_params.backbone import ConvNetConfig, ParamConvNet, dataset_config
from dynaneural.sample_wise.dynamic_params.functional import conv_output_size, per_sample_conv2d

__all__ = ["HyperConv2d", "build_hypernetwork_net"]


class HyperConv2d(nn.Module):
    """Convolution whose kernel a hypernetwork generates from the input → BN → ReLU.

    Args:
        in_chs, out_chs: channels. stride: conv stride. in_size: input height = width (for the cost).
        embed_dim: d, the hypernetwork's embedding size. chunk: output channels generated per chunk
            (must divide ``out_chs``).
    """

    def __init__(self, *, in_chs: int, out_chs: int, stride: int, in_size: int, embed_dim: int = 8, chunk: int = 16,
                 kernel_size: int = 3) -> None:
        super().__init__()
        chunk = min(chunk, out_chs)
        if out_chs % chunk:
            raise ValueError(f"chunk {chunk} must divide out_chs {out_chs}")
        self.in_chs, self.out_chs, self.stride, self.k = in_chs, out_chs, stride, kernel_size
        self.padding = kernel_size // 2
        self.chunk, self.num_chunks, self.embed_dim = chunk, out_chs // chunk, embed_dim
        self.embedding = nn.Parameter(torch.randn(self.num_chunks, embed_dim))  # e_j
        self.project = nn.Linear(in_chs, embed_dim, bias=False)  # P: the input's shift of the embeddings
        self.w_in = nn.Linear(embed_dim, embed_dim)
        chunk_numel = chunk * in_chs * kernel_size * kernel_size
        self.w_out = nn.Linear(embed_dim, chunk_numel)
        # Generated kernels start at the scale of a Kaiming-initialised convolution: std(a) ≈ 1/√3, d terms.
        nn.init.normal_(self.w_out.weight, std=math.sqrt(6.0 / (in_chs * kernel_size * kernel_size * embed_dim)))
        nn.init.zeros_(self.w_out.bias)
        self.bn = nn.BatchNorm2d(out_chs)
        self.in_size = in_size
        self.out_size = conv_output_size(in_size, kernel_size=kernel_size, stride=stride, padding=self.padding)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input code (B, d), a (B, J, d)) of the hypernetwork's first layer."""
        u = self.project(x.mean((2, 3)))  # (B, d)
        a = self.w_in(self.embedding.unsqueeze(0) + u.unsqueeze(1))  # (B, J, d)
        return u, a

    def forward(self, x: torch.Tensor, *, mode: Mode = Mode.EXECUTE) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        u, a = self.codes(x)
        basis_shape = (self.chunk, self.in_chs, self.k, self.k)
        if mode is Mode.SIMULATE:
            # d + 1 basis kernels of `chunk` output channels each: the columns of W_out, then b_out.
            basis = torch.cat([self.w_out.weight.t(), self.w_out.bias.unsqueeze(0)]).reshape(-1, *basis_shape[1:])
            ys = F.conv2d(x, basis, stride=self.stride, padding=self.padding)  # (B, (d+1)·chunk, H', W')
            ys = ys.view(b, self.embed_dim + 1, self.chunk, *ys.shape[-2:])
            coef = torch.cat([a, a.new_ones(b, self.num_chunks, 1)], -1)  # (B, J, d+1)
            y = torch.einsum("bjm,bmchw->bjchw", coef, ys).reshape(b, self.out_chs, *ys.shape[-2:])
        else:
            w = self.w_out(a).view(b, self.out_chs, *basis_shape[1:])  # (B, J, chunk·Ci·k·k) → (B, Co, Ci, k, k)
            y = per_sample_conv2d(x, w, stride=self.stride, padding=self.padding)
        return F.relu(self.bn(y)), u.argmax(1)

    def cost(self) -> float:
        """FLOPs per sample: pooling + projection + the hypernetwork's two layers + convolution + batch norm."""
        kernel = self.out_chs * self.in_chs * self.k * self.k
        hw_out = self.out_size * self.out_size
        hyper = self.in_chs * self.in_size ** 2 + self.in_chs * self.embed_dim \
            + self.num_chunks * self.embed_dim ** 2 + self.embed_dim * kernel
        return float(hyper + kernel * hw_out + 2 * self.out_chs * hw_out)


@register_flops_rule(HyperConv2d)
def _hyperconv_flops(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    assert isinstance(m, HyperConv2d)
    return m.cost() * inputs[0].shape[0]


def build_hypernetwork_net(cfg: ConvNetConfig, *, embed_dim: int = 8, chunk: int = 16) -> ParamConvNet:
    """The backbone CNN with every layer after the stem a hypernetwork-generated convolution."""
    return ParamConvNet(cfg, lambda **kw: HyperConv2d(embed_dim=embed_dim, chunk=chunk, **kw), method="hypernetwork")


@register_model
def hypernetwork_mnist(*, embed_dim: int = 8, chunk: int = 16, num_classes: int = 10,
                       widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """28×28 (Fashion-)MNIST: stem 32 → HyperConv 64 (stride 2) → HyperConv 128 (stride 2) (or ``widths``)."""
    return build_hypernetwork_net(dataset_config("mnist", num_classes=num_classes, widths=widths),
                                  embed_dim=embed_dim, chunk=chunk)


@register_model
def hypernetwork_cifar10(*, embed_dim: int = 8, chunk: int = 16, num_classes: int = 10,
                         widths: tuple[int, ...] | None = None) -> ParamConvNet:
    """32×32 CIFAR-10: stem 32 → HyperConv 64, 128 (stride 2), 128 (or ``widths``)."""
    return build_hypernetwork_net(dataset_config("cifar10", num_classes=num_classes, widths=widths),
                                  embed_dim=embed_dim, chunk=chunk)


@register_model
def test_hypernetwork(*, embed_dim: int = 4, chunk: int = 4, num_classes: int = 10) -> ParamConvNet:
    """Tiny variant for tests: 1×8×8 inputs, stem 4 → HyperConv 8 → HyperConv 8 (2 chunks each)."""
    return build_hypernetwork_net(ConvNetConfig(in_chans=1, input_size=8, num_classes=num_classes, widths=(4, 8, 8),
                                                strides=(1, 2, 1)), embed_dim=embed_dim, chunk=chunk)
