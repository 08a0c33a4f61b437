"""Pictures of token-level decisions: which patches each image kept (DynamicViT), how deep each token ran (A-ViT),
which patches were merged together (ToMe), overlaid on the input images as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["render", "token_maps"]


def token_maps(model: Any, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-patch maps (B, g, g) of a token model's execute-mode decisions, and what they show."""
    g = model.cfg.vit.grid
    with torch.inference_mode():
        out = model(images, mode="execute")
    d = out.decisions
    if "keep" in d:  # DynamicViT: the stage at which each patch was dropped (S+1 = kept to the end)
        keep = d["keep"].long()  # (B, S, P)
        return (keep.sum(1) + 1).float().view(-1, g, g), "stages survived (1 = dropped at the first stage)"
    if "depth" in d:  # A-ViT: blocks each patch token ran
        return d["depth"][:, 1:].float().view(-1, g, g), "blocks run before halting"
    if "group" in d:  # ToMe: the merged group each patch ended in
        return d["group"][:, 1:].float().view(-1, g, g), "merged group (same colour = one token)"
    raise ValueError(f"{type(model).__name__} has no token decisions to draw")


def render(model: Any, images: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Write one PNG per image: the image with its token decisions overlaid. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    maps, label = token_maps(model, images)
    size = images.shape[-1]
    cmap = "tab20" if "group" in label else "viridis"
    paths = []
    for i in range(images.shape[0]):
        img = images[i].detach().float()
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray",
                  extent=(0, size, size, 0))
        im = ax.imshow(maps[i].numpy(), cmap=cmap, alpha=0.45, extent=(0, size, size, 0), interpolation="nearest")
        ax.set_title(f"{type(model).__name__}: {label}", fontsize=6)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
        path = out_dir / f"{type(model).__name__.lower()}_{i:03d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


#: what ``dynaneural visualize --kind ...`` dispatches on (cli/cmd_visualize.py).
VISUALIZE_KINDS = {"kept-tokens": render}
