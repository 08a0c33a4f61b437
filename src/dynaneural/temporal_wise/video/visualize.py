"""Pictures of what a temporal model read: per-sample timelines of the frames looked at / steps read (PNG).

* :func:`plot_timelines` — one row per sample, one cell per frame or step: read (dark, with the visiting order
  when known) or skipped (light); key frames (where the content is) outlined; the prediction and label at the right.
* :func:`plot_clip_selection` — the frames of a few clips as thumbnails, the ones looked at framed in colour with
  their visiting order, the skipped ones dimmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

__all__ = ["plot_clip_selection", "plot_timelines"]


def _np(t: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    return None if t is None else (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))


def plot_timelines(read: torch.Tensor, path: str | Path, *, order: torch.Tensor | None = None,
                   key: torch.Tensor | None = None, labels: Sequence[int] | torch.Tensor | None = None,
                   preds: Sequence[int] | torch.Tensor | None = None, title: str = "", step_name: str = "frame",
                   max_rows: int = 24) -> Path:
    """Timelines of which steps each sample read.

    Args:
        read: (N, T) bool, steps read.
        path: PNG to write (folder created).
        order: (N, K) visiting order (frame index per step, -1 after the stop), drawn as numbers in the cells.
        key: (N, T) bool, the steps that carry the content (outlined in red).
        labels, preds: per-sample label and prediction, printed at the right of each row.
        title: figure title. step_name: axis label. max_rows: samples drawn.
    """
    r = _np(read).astype(bool)[:max_rows]  # type: ignore[union-attr]
    n, t = r.shape
    o, k = _np(order), _np(key)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * t + 2.0), max(2.0, 0.32 * n + 1.0)))
    ax.imshow(np.where(r, 0.85, 0.08), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if o is not None:
        for i in range(n):
            for step, f in enumerate(o[i]):
                if f >= 0:
                    ax.text(f, i, str(step + 1), ha="center", va="center", fontsize=7, color="white")
    if k is not None:
        for i, j in zip(*np.nonzero(k[:n]), strict=True):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    if labels is not None:
        lab = _np(torch.as_tensor(labels))
        pr = _np(torch.as_tensor(preds)) if preds is not None else None
        for i in range(n):
            txt = f"y={int(lab[i])}" + (f" pred={int(pr[i])}" if pr is not None else "")  # type: ignore[index]
            wrong = pr is not None and pr[i] != lab[i]  # type: ignore[index]
            ax.text(t - 0.3, i, "  " + txt, va="center", fontsize=7, color="red" if wrong else "black")
    ax.set_xticks(range(t))
    ax.set_yticks(range(n))
    ax.set_xlabel(f"{step_name} (dark = read, numbers = visiting order, red box = key {step_name})")
    ax.set_ylabel("sample")
    ax.set_xlim(-0.5, t + 1.5)
    fig.suptitle(title or f"{r.mean() * 100:.0f}% of {step_name}s read", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_clip_selection(clips: torch.Tensor, read: torch.Tensor, path: str | Path, *,
                        order: torch.Tensor | None = None, labels: Sequence[int] | torch.Tensor | None = None,
                        preds: Sequence[int] | torch.Tensor | None = None, max_clips: int = 6) -> Path:
    """Thumbnails of ``clips`` (N, T, 1, H, W): looked-at frames framed in colour with their order, others dimmed."""
    c = _np(clips)[:max_clips, :, 0]  # type: ignore[index]
    r = _np(read).astype(bool)[:max_clips]  # type: ignore[union-attr]
    o = _np(order)
    n, t = r.shape
    fig, axes = plt.subplots(n, t, figsize=(1.0 * t, 1.05 * n + 0.4), squeeze=False)
    for i in range(n):
        for j in range(t):
            ax = axes[i, j]
            ax.imshow(c[i, j], cmap="gray", alpha=1.0 if r[i, j] else 0.25)
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_edgecolor("tab:orange" if r[i, j] else "lightgray")
                s.set_linewidth(2.5 if r[i, j] else 0.5)
            if o is not None and r[i, j]:
                step = int(np.flatnonzero(o[i] == j)[0]) + 1 if (o[i] == j).any() else 0
                ax.set_title(f"#{step}", fontsize=7, pad=1)
        if labels is not None:
            lab = int(torch.as_tensor(labels)[i])
            pred = "" if preds is None else f" pred {int(torch.as_tensor(preds)[i])}"
            axes[i, 0].set_ylabel(f"y={lab}{pred}", fontsize=7)
    fig.suptitle("frames looked at (framed, #visit order); dimmed = never processed", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
