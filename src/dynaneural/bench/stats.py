"""Statistics across training seeds: is a per-seed accuracy gain (in pp) positive beyond seed-to-seed noise?

Each gain is the difference of two networks trained with the same seed (initialisation and data order), so the
tests are paired: a one-sided t-test of the mean gain and the exact sign test. Both come from SciPy, which
scikit-learn already requires.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["format_p", "gain_statistics"]


def gain_statistics(gains: Sequence[float], *, prefix: str) -> dict[str, Any]:
    """``{prefix}_pp_mean``, ``_pp_std`` (sample), ``_pp_sem``, ``_t_test_p`` and ``_sign_test_p`` (one-sided,
    alternative: the gain is positive; the sign test counts only the seeds whose gain is not zero) and
    ``{prefix}_seeds_ahead``. A statistic that needs two seeds (or any spread) is ``None`` without them."""
    from scipy import stats

    gains = [float(g) for g in gains]
    nonzero = [g for g in gains if g != 0]
    out: dict[str, Any] = {
        f"{prefix}_pp_mean": statistics.fmean(gains) if gains else None,
        f"{prefix}_pp_std": statistics.stdev(gains) if len(gains) > 1 else None,
        f"{prefix}_pp_sem": float(stats.sem(gains)) if len(gains) > 1 else None,
        f"{prefix}_t_test_p": None, f"{prefix}_sign_test_p": None,
        f"{prefix}_seeds_ahead": sum(g > 0 for g in gains),
    }
    if len(gains) > 1 and out[f"{prefix}_pp_sem"] > 0:
        out[f"{prefix}_t_test_p"] = float(stats.ttest_1samp(gains, 0.0, alternative="greater").pvalue)
    if len(gains) > 1 and nonzero:
        out[f"{prefix}_sign_test_p"] = float(
            stats.binomtest(sum(g > 0 for g in nonzero), len(nonzero), 0.5, alternative="greater").pvalue)
    return out


def format_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"
