"""Distances between sample sets (sample quality for low-dimensional targets)."""
from __future__ import annotations

import torch

__all__ = ["energy_distance", "sliced_wasserstein", "energy_distance_floor"]


def _mean_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    tot = torch.zeros((), dtype=torch.float64)
    for i in range(0, a.shape[0], chunk):
        tot = tot + torch.cdist(a[i:i + chunk], b).sum()
    return tot / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic), ``x: [N, *D]``, ``y: [M, *D]``.

    Zero iff the distributions agree; its value for two independent samples of one distribution
    (``energy_distance_floor``) is the noise floor to compare against."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("inf")
    return float(2 * _mean_dist(x, y) - _mean_dist(x, x) - _mean_dist(y, y))


def energy_distance_floor(sample_fn, n: int, repeats: int = 3) -> float:
    """Mean energy distance between pairs of independent ``n``-samples from ``sample_fn(n)``."""
    return sum(energy_distance(sample_fn(n), sample_fn(n)) for _ in range(repeats)) / repeats


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance over random directions (equal sample sizes)."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("inf")
    v = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    v = v / v.norm(dim=0, keepdim=True)
    px, _ = (x @ v).sort(0)
    py, _ = (y @ v).sort(0)
    return float((px - py).pow(2).mean().sqrt())
