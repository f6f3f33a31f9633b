"""Distances between sample sets (sample quality for low-dimensional targets)."""
from __future__ import annotations

import torch

__all__ = ["energy_distance", "sliced_wasserstein", "gaussian_stats", "frechet_distance"]


def _mean_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    tot = torch.zeros((), dtype=torch.float64)
    for i in range(0, a.shape[0], chunk):
        tot = tot + torch.cdist(a[i:i + chunk], b).sum()
    return tot / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic), ``x: [N, *D]``, ``y: [M, *D]``.

    Zero iff the distributions agree; its value for two independent samples of one distribution is
    the noise floor to compare against."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("inf")
    return float(2 * _mean_dist(x, y) - _mean_dist(x, x) - _mean_dist(y, y))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
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


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[F]`` and covariance ``[F, F]`` (unbiased, float64) of ``features: [N, F]``."""
    f = features.reshape(features.shape[0], -1).double()
    if f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 samples, got {f.shape[0]}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:
    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2)`` (float64, symmetric square roots)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes disagree: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"cov {tuple(cov1.shape)}/{tuple(cov2.shape)}")
    lam, U = torch.linalg.eigh(0.5 * (cov1 + cov1.T))
    root1 = (U * lam.clamp(min=0).sqrt()) @ U.T
    m = root1 @ (0.5 * (cov2 + cov2.T)) @ root1
    tr_cross = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * tr_cross)
