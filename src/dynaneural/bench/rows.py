"""The rows every ``dynaneural bench`` command writes, and the JSON file around them.

Every family reports the same keys as the early-exit benchmark (accuracy, mean FLOPs, theoretical speed-up =
static FLOPs / mean FLOPs, realized speed-up = static time / dynamic time measured interleaved in one run, and
their ratio), plus method-specific keys in ``extra`` (flattened into the row when written).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dynaneural.bench.timing import compare
from dynaneural.version import __version__

__all__ = ["SpeedupRow", "format_rows", "time_against_static", "write_bench_json"]


@dataclass
class SpeedupRow:
    """One (method, budget, batch size) measurement; the keys shared by every bench command."""

    method: str
    batch_size: int
    accuracy: float
    mean_flops: float
    static_flops: float
    theoretical_speedup: float
    realized_speedup: float
    realized_over_theoretical: float
    static_ms_per_sample: float
    dynamic_ms_per_sample: float
    timed_samples: int
    budget: float = math.nan
    unit: str = "fraction"
    achieved_budget: float = math.nan
    budget_error: float = math.nan
    latency_model_speedup: float = math.nan
    static_accuracy: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_loss_pp(self) -> float:
        return (self.static_accuracy - self.accuracy) * 100.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["accuracy_loss_pp"] = self.accuracy_loss_pp
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeedupRow:
        """The row back from :meth:`to_dict` (a bench JSON's ``rows`` entry): the shared keys become fields, every
        other key goes to ``extra`` (``accuracy_loss_pp`` is derived, so it is dropped)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = sorted(f.name for f in fields(cls)
                         if f.name in names and f.default is MISSING and f.default_factory is MISSING
                         and f.name not in d)
        if missing:
            raise ValueError(f"not a bench row: missing {missing}")
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names and k != "accuracy_loss_pp"})


@torch.inference_mode()
def time_against_static(static_fn: Callable[[torch.Tensor], Any], dynamic_fn: Callable[[torch.Tensor], Any],
                        x: torch.Tensor, *, batch_size: int, repeats: int = 9, warmup: int = 2
                        ) -> dict[str, float]:
    """Interleaved medians of running ``x`` in batches through both sides: ms per sample and the ratio."""
    def run(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        return lambda: [fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]  # type: ignore[func-returns-value]

    cmp = compare(run(static_fn), run(dynamic_fn), repeats=repeats, warmup=warmup)
    return {"realized_speedup": cmp.speedup, "static_ms_per_sample": cmp.baseline_s * 1e3 / x.shape[0],
            "dynamic_ms_per_sample": cmp.candidate_s * 1e3 / x.shape[0], "timed_samples": int(x.shape[0])}


def write_bench_json(path: str | Path, rows: Sequence[SpeedupRow | dict[str, Any]], **meta: Any) -> Path:
    """Write ``{meta..., environment, command, rows: [...]}`` as indented JSON (creates the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"library_version": __version__, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
           "allocator": {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")},
           "command": "dynaneural " + " ".join(sys.argv[1:]), **meta,
           "rows": [r.to_dict() if isinstance(r, SpeedupRow) else r for r in rows]}
    tmp = path.with_name(path.name + ".tmp")  # a run cut while writing leaves the previous file whole
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    tmp.replace(path)
    return path


def format_rows(rows: Sequence[SpeedupRow | dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of rows (default columns: the shared keys)."""
    dicts = [r.to_dict() if isinstance(r, SpeedupRow) else r for r in rows]
    cols = list(columns or ["method", "budget", "batch_size", "accuracy", "accuracy_loss_pp", "mean_flops",
                            "theoretical_speedup", "realized_speedup", "realized_over_theoretical"])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [cols] + [[fmt(d.get(c, "")) for c in cols] for d in dicts]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in table)
