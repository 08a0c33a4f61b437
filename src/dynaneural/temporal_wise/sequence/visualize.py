"""Pictures of what a sequence model read: per-sample timelines of steps read, skipped, jumped over or never reached.

:func:`timeline_codes` turns a model output's decisions into one code per (sample, step); :func:`plot_timelines`
draws them as a grid (one row per sample, one cell per step, the token written in the cell when given) and
saves a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["CODES", "plot_timelines", "timeline_codes"]

#: code -> (label, colour)
CODES: dict[int, tuple[str, str]] = {
    0: ("padding", "#f0f0f0"),
    1: ("read / updated", "#1f5fa8"),
    2: ("skipped update", "#a6cbe8"),
    3: ("jumped over", "#f4a259"),
    4: ("not read (stopped)", "#ffffff"),
    5: ("skimmed (partial update)", "#8fd19e"),
}


def timeline_codes(out: object, x: torch.Tensor | None = None, *, pad_id: int | None = 0,
                   skip_code: int = 2) -> torch.Tensor:
    """(B, T) int codes from a sequence model's output.

    ``decisions["updates"]`` (Skip RNN, Skim-RNN): 1 where updated, ``skip_code`` (2 skipped, 5 skimmed) elsewhere.
    ``decisions["read"]`` (LSTM-Jump, early stop): 1 where read, 3 for unread steps before the last one read
    (jumped over), 4 after it (never reached). Token inputs ``x`` mark padding (code 0).
    """
    d = out.decisions  # type: ignore[attr-defined]
    if "updates" in d:
        upd = d["updates"].bool()
        codes = torch.where(upd, torch.ones_like(upd, dtype=torch.long), torch.full_like(upd, skip_code,
                                                                                          dtype=torch.long))
    elif "read" in d:
        read = d["read"].bool()
        steps = read.shape[1]
        pos = torch.arange(steps, device=read.device).expand_as(read)
        last = torch.where(read, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
        codes = torch.where(read, 1, torch.where(pos < last, 3, 4)).long()
    else:
        raise ValueError(f"no 'updates' or 'read' decisions to draw (got {sorted(d)})")
    if x is not None and pad_id is not None and not x.is_floating_point():
        codes = torch.where(x == pad_id, torch.zeros_like(codes), codes)
    return codes.cpu()


def plot_timelines(codes: torch.Tensor, path: str | Path, *, tokens: Sequence[Sequence[str]] | None = None,
                   row_labels: Sequence[str] | None = None, title: str = "") -> Path:
    """Draw (N, T) timeline codes as a PNG (one row per sample); ``tokens`` writes each step's word in its cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    codes = torch.as_tensor(codes).long()
    if codes.dim() != 2 or codes.numel() == 0:
        raise ValueError(f"codes must be a non-empty (N, T) tensor, got shape {tuple(codes.shape)}")
    n, steps = codes.shape
    cmap = ListedColormap([CODES[k][1] for k in sorted(CODES)])
    cell_w = 0.55 if tokens is not None else 0.12
    fig, ax = plt.subplots(figsize=(min(2 + steps * cell_w, 40), 1.2 + 0.35 * n))
    ax.imshow(codes.numpy(), cmap=cmap, vmin=0, vmax=len(CODES) - 1, aspect="auto", interpolation="nearest")
    if tokens is not None:
        for i, row in enumerate(tokens[:n]):
            for t, word in enumerate(list(row)[-steps:] if len(row) > steps else row):
                if word:
                    dark = int(codes[i, t]) == 1
                    ax.text(t, i, word[:8], ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(row_labels) if row_labels is not None else [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("step")
    ax.set_xticks(range(0, steps, max(1, steps // 20)))
    present = sorted(set(codes.flatten().tolist()))
    ax.legend(handles=[Patch(facecolor=CODES[k][1], edgecolor="#888888", label=CODES[k][0]) for k in present],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 if n > 3 else -0.35), ncol=len(present), fontsize=7,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
