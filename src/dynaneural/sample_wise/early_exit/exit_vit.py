"""A multi-exit Vision Transformer: an exit classifier on the class token after every block.

Papers: J. Xin, R. Tang, J. Lee, Y. Yu, J. Lin, "DeeBERT: Dynamic Early Exiting for Accelerating BERT Inference",
ACL 2020, arXiv:2004.12993 (an off-ramp classifier after every transformer layer, entropy / confidence exits);
A. Bakhtiarnia, Q. Zhang, A. Iosifidis, "Multi-Exit Vision Transformer for Dynamic Inference", BMVC 2021,
arXiv:2106.15183 (the same on ViT). The backbone is the ViT of :mod:`dynaneural.spatial_wise.token.vit`
(Dosovitskiy et al., arXiv:2010.11929), optionally with its convolutional stem.

Layout, as a :class:`~dynaneural.sample_wise.early_exit.multi_exit.MultiExitNetwork`:

    stage 0: tokens = [class token; embed(image)] + position embedding, then block 0
    stage i (1 ≤ i < depth): block i
    exit after stage i: LayerNorm + linear on the class token (the last exit is the ViT's own head)

Why this architecture matters to early exit: every block has the same token count and width, so the same FLOPs
*and* the same FLOP rate. In a CNN the early, high-resolution stages run at a lower FLOP rate than the late ones,
so exiting after them saves less time than FLOPs promise (the latency-model column of the benchmarks); here an
exit saves time in proportion to the FLOPs it saves, which isolates what the execution machinery itself costs.
``exits="last"`` is the static ViT of the same design and ``num_stages`` truncates it (the static family).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from dynaneural.registry import register_model
from dynaneural.sample_wise.early_exit.multi_exit import MultiExitNetwork
from dynaneural.spatial_wise.token.vit import Block, PatchEmbed, ViTConfig, init_vit_weights

__all__ = ["ExitViTConfig", "build_exit_vit", "TokenEmbed", "ClassTokenHead"]


@dataclass(frozen=True)
class ExitViTConfig:
    """Args:
    vit: the backbone ViT (its depth is the number of blocks, each followed by an exit).
    num_stages: keep only the first num_stages blocks (None = all).
    exits: ``"all"`` (an exit after every block) or ``"last"`` (static ViT). exit_policy: learned exit-policy heads.
    """

    vit: ViTConfig = ViTConfig(dim=192, depth=6, heads=3, mlp_ratio=4.0, stem="conv")
    num_stages: int | None = None
    exits: Literal["all", "last"] = "all"
    exit_policy: bool = False

    def __post_init__(self) -> None:
        if self.num_stages is not None and not 1 <= self.num_stages <= self.vit.depth:
            raise ValueError(f"num_stages must be in [1, {self.vit.depth}], got {self.num_stages}")
        if self.exits not in ("all", "last"):
            raise ValueError(f"exits must be 'all' or 'last', got {self.exits!r}")


class TokenEmbed(nn.Module):
    """Image (B, C, H, W) → tokens (B, 1 + N, D): class token first, learned position embedding added."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed


class ClassTokenHead(nn.Module):
    """Exit classifier: LayerNorm and a linear layer on the class token only (the other tokens are not read)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(tokens[:, 0]))


def build_exit_vit(cfg: ExitViTConfig) -> MultiExitNetwork:
    vit = cfg.vit
    n = cfg.num_stages or vit.depth
    stages: list[nn.Module] = [nn.Sequential(TokenEmbed(vit), Block(vit))] + [Block(vit) for _ in range(n - 1)]
    exit_at = range(n) if cfg.exits == "all" else [n - 1]
    heads = {i: ClassTokenHead(vit.dim, vit.num_classes) for i in exit_at}
    model = MultiExitNetwork(stages=stages, heads=heads, num_classes=vit.num_classes, input_shape=vit.input_shape,
                             exit_policy=cfg.exit_policy, config=asdict(cfg))
    for part in (model.stages, model.heads):
        part.apply(init_vit_weights)
    return model


@register_model
def exit_vit_mnist(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                   exit_policy: bool = False, num_classes: int = 10, dim: int = 192, depth: int = 6, heads: int = 3,
                   mlp_ratio: float = 4.0, stem: str = "conv") -> MultiExitNetwork:
    """28×28 MNIST / Fashion-MNIST: 7×7 tokens, DeiT-tiny width (D = 192, 3 heads), 6 blocks, an exit after each."""
    vit = ViTConfig(in_chans=1, img_size=28, patch_size=4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                    num_classes=num_classes, stem=stem)
    return build_exit_vit(ExitViTConfig(vit=vit, num_stages=num_stages, exits=exits, exit_policy=exit_policy))


@register_model
def test_exit_vit(*, num_stages: int | None = None, exits: Literal["all", "last"] = "all",
                  exit_policy: bool = False, num_classes: int = 10) -> MultiExitNetwork:
    """Tiny variant for tests: 3 blocks of width 16 on 1×8×8 inputs (2×2 patches, conv stem)."""
    vit = ViTConfig(in_chans=1, img_size=8, patch_size=2, dim=16, depth=3, heads=2, mlp_ratio=2.0,
                    num_classes=num_classes, stem="conv")
    return build_exit_vit(ExitViTConfig(vit=vit, num_stages=num_stages, exits=exits, exit_policy=exit_policy))
