"""Rank correlation between sample quality and each predictor, with bootstrap confidence intervals.

``spearman(x, y)`` is Pearson's correlation of the ranks (``scipy.stats.rankdata``: ties get their
average rank), the same number as ``scipy.stats.spearmanr``; ``+inf`` values (a diverged sampler) rank last,
NaN pairs are dropped. ``bootstrap_ci`` resamples the (x, y) pairs with replacement and takes percentiles.
``correlation_table(rows, quality_key, predictors)`` builds the study's table.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

__all__ = ["spearman", "bootstrap_ci", "correlation_table"]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _clean(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def spearman(x, y) -> float:
    """Spearman's rank correlation of paired samples ``x, y: [n]`` (NaN pairs dropped; NaN if n < 3
    or a variable is constant)."""
    x, y = _clean(x, y)
    if x.size < 3:
        return float("nan")
    return _pearson(rankdata(x), rankdata(y))


def bootstrap_ci(x, y, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``spearman(x, y)`` over ``n_boot`` resamples of the pairs
    (resamples where a variable is constant are skipped)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = _clean(x, y)
    n = x.size
    if n < 3:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        r = _pearson(rankdata(x[idx]), rankdata(y[idx]))
        if not math.isnan(r):
            stats.append(r)
    if not stats:
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def correlation_table(rows: list[dict], quality_key: str, predictors, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> list[dict]:
    """One row per predictor: ``{"predictor", "spearman", "ci_low", "ci_high", "n"}`` over the models
    ``rows`` (each ``{"quality": {...}, "predictors": {...}}``), correlating ``quality[quality_key]``."""
    q = [float(r["quality"][quality_key]) for r in rows]
    out = []
    for name in predictors:
        p = [float(r["predictors"][name]) for r in rows]
        lo, hi = bootstrap_ci(p, q, n_boot, confidence, seed)
        n = int(sum(1 for a, b in zip(p, q) if not (math.isnan(a) or math.isnan(b))))
        out.append({"predictor": name, "spearman": spearman(p, q), "ci_low": lo, "ci_high": hi, "n": n})
    return out
