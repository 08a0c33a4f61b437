"""PNG plots of a benchmark: accuracy against compute, and where samples left."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_accuracy_vs_compute", "plot_exit_histogram"]


def plot_accuracy_vs_compute(rows: Sequence[dict[str, Any]], path: str | Path, *, static: Sequence[dict[str, Any]] = (),
                             x_key: str = "mean_flops", title: str = "") -> Path:
    """Dynamic curve (one point per budget) with the static networks as separate markers."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    dyn = sorted(rows, key=lambda r: r[x_key])
    ax.plot([r[x_key] / 1e6 for r in dyn], [100 * r["accuracy"] for r in dyn], "o-", label="dynamic (calibrated)")
    if static:
        st = sorted(static, key=lambda r: r["flops"])
        ax.plot([r["flops"] / 1e6 for r in st], [100 * r["accuracy"] for r in st], "s--", label="static family")
    ax.set_xlabel("mean MFLOPs per sample (multiply-adds)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_exit_histogram(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Fraction of test samples leaving at each exit, one group of bars per budget."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    n = len(rows)
    width = 0.8 / max(n, 1)
    for i, r in enumerate(rows):
        fr = r["exit_fractions"]
        ax.bar([k + i * width - 0.4 + width / 2 for k in range(len(fr))], [100 * f for f in fr], width,
               label=f"budget {r['budget']:g} {r.get('unit', '')}")
    ax.set_xlabel("exit")
    ax.set_ylabel("samples leaving here (%)")
    ax.set_title(title or "exit histogram")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
