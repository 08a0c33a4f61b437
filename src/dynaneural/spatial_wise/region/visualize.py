"""Pictures of region-level decisions: the patches GFNet focused on (numbered by step) and the window a spatial
transformer chose, drawn on the input images as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["regions", "render"]


def regions(model: Any, images: torch.Tensor) -> list[list[tuple[float, float, float, float]]]:
    """Per image, the chosen boxes (top, left, height, width) in pixels, in order (execute-mode decisions)."""
    from dynaneural.spatial_wise.region.gfnet import GFNet, patch_origins
    from dynaneural.spatial_wise.region.stn import STNSelector

    with torch.inference_mode():
        out = model(images, mode="execute")
    size = images.shape[-1]
    boxes: list[list[tuple[float, float, float, float]]] = []
    if isinstance(model, GFNet):
        p = model.cfg.patch
        for locs in out.decisions["patch"]:
            valid = locs[locs >= 0]
            r, c = patch_origins(model.cfg, valid)
            boxes.append([(float(a), float(b), float(p), float(p)) for a, b in zip(r.tolist(), c.tolist(), strict=True)])
        return boxes
    if isinstance(model, STNSelector):
        for s, tx, ty in out.decisions["region"].tolist():
            side = s * size
            boxes.append([((ty + 1) * size / 2 - side / 2, (tx + 1) * size / 2 - side / 2, side, side)])
        return boxes
    raise ValueError(f"{type(model).__name__} has no region decisions to draw")


def render(model: Any, images: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Write one PNG per image with the chosen regions drawn on it. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    boxes = regions(model, images)
    paths = []
    for i in range(images.shape[0]):
        img = images[i].detach().float()
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray")
        for k, (top, left, h, w) in enumerate(boxes[i]):
            ax.add_patch(mpatches.Rectangle((left - 0.5, top - 0.5), w, h, fill=False, lw=1.5,
                                            edgecolor=plt.cm.autumn(k / max(len(boxes[i]), 1))))
            ax.text(left, top + 1.5, str(k + 1), color="yellow", fontsize=7)
        ax.set_title(f"{type(model).__name__}: {len(boxes[i])} region(s)", fontsize=7)
        ax.axis("off")
        path = out_dir / f"{type(model).__name__.lower()}_{i:03d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


#: what ``dynaneural visualize --kind ...`` dispatches on (cli/cmd_visualize.py).
VISUALIZE_KINDS = {"regions": render}
