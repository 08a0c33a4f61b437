"""Pictures of where a pixel-level dynamic network computed: mask overlays on the input images (PNG).

For DynConv/SBNet models every gated block's execute mask is drawn over the input (computed positions bright
and tinted, skipped positions dimmed); for SACT the per-stage ponder-cost maps (N + R, the paper's figures).
``VISUALIZE_KINDS`` is what ``dynaneural visualize --kind ...`` dispatches on (``cli/cmd_visualize.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["VISUALIZE_KINDS", "mask_overlay", "save_mask_grid", "visualize_pixel_masks"]


def _display(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) normalised image → (H, W, 3) in [0, 1] (min-max per image; grey for one channel)."""
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].permute(1, 2, 0)


def mask_overlay(image: torch.Tensor, mask: torch.Tensor, *, color: Sequence[float] = (1.0, 0.2, 0.1),
                 alpha: float = 0.45, dim: float = 0.35) -> torch.Tensor:
    """Overlay a mask on an image.

    Args:
        image: (C, H, W) input image (any normalisation).
        mask: (h, w) bool or float in [0, 1] (any resolution; nearest-upsampled to H × W).
        color: tint of the active positions. alpha: tint strength. dim: brightness of inactive positions.

    Returns:
        (H, W, 3) float image in [0, 1].
    """
    img = _display(image)
    h, w = img.shape[:2]
    m = F.interpolate(mask.detach().float().cpu()[None, None], size=(h, w), mode="nearest")[0, 0, :, :, None]
    tint = torch.tensor(color).view(1, 1, 3)
    on = (1 - alpha) * img + alpha * tint
    return (m * on + (1 - m) * dim * img).clamp(0, 1)


def save_mask_grid(images: torch.Tensor, masks: Sequence[torch.Tensor], path: str | Path, *,
                   titles: Sequence[str] | None = None, scale_to_max: bool = False) -> Path:
    """One row per image: the input, then one overlay per mask. ``masks``: each (N, h, w); ``scale_to_max``
    divides float maps (e.g. ponder costs) by their maximum first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, k = images.shape[0], len(masks)
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(_display(images[i]).numpy())
        for j, m in enumerate(masks):
            mi = m[i].float()
            if scale_to_max:
                mi = mi / mi.max().clamp_min(1e-8)
            axes[i][j + 1].imshow(mask_overlay(images[i], mi).numpy())
            if i == 0 and titles:
                axes[i][j + 1].set_title(titles[j], fontsize=7)
        if i == 0:
            axes[i][0].set_title("input", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.inference_mode()
def visualize_pixel_masks(model: nn.Module, images: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Run ``model`` in execute mode on ``images`` and write ``pixel_masks.png`` (gated models: one column per gated
    block, titled with the mean active fraction) or ``ponder_maps.png`` (SACT: one column per stage)."""
    model.eval()
    out = model(images, mode="execute")
    out_dir = Path(out_dir)
    if getattr(out, "masks", None):
        titles = [f"block {i}: {100 * float(m.float().mean()):.0f}% on" for i, m in enumerate(out.masks)]
        return [save_mask_grid(images, out.masks, out_dir / "pixel_masks.png", titles=titles)]
    if getattr(out, "ponder_maps", None):
        titles = [f"stage {i}: ponder {float(p.mean()):.2f}" for i, p in enumerate(out.ponder_maps)]
        return [save_mask_grid(images, out.ponder_maps, out_dir / "ponder_maps.png", titles=titles,
                               scale_to_max=True)]
    raise ValueError(f"{type(model).__name__} reports no pixel masks or ponder maps; the pixel-mask picture needs "
                     "a DynConv, SBNet or SACT model")


VISUALIZE_KINDS = {"pixel-mask": visualize_pixel_masks}
