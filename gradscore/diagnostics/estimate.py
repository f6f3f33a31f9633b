"""The value every diagnostic returns: a Monte Carlo estimate with its standard error."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Estimate", "jackknife", "ustat_stderr"]


@dataclass
class Estimate:
    """``value +- stderr`` (one standard error). ``extra`` holds named side results
    (e.g. ``lower_bound``, ``t``, ``n_points``); ``float(est)`` is ``est.value``."""

    value: float
    stderr: float
    extra: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """``(value - z stderr, value + z stderr)``."""
        return self.value - z * self.stderr, self.value + z * self.stderr

    def to_dict(self) -> dict:
        out = {"value": float(self.value), "stderr": float(self.stderr)}
        out.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in self.extra.items()})
        return out

    def __repr__(self) -> str:
        return f"Estimate({self.value:.6g} +- {self.stderr:.2g})"


def jackknife(statistic, n_blocks: int):
    """Delete-one-block jackknife: ``statistic(keep)`` maps a boolean mask ``[n_blocks]`` of the blocks
    to use onto a float or a tuple of floats. Returns ``(full, stderr)`` (tuples if the statistic is)."""
    full = statistic(torch.ones(n_blocks, dtype=torch.bool))
    scalar = not isinstance(full, tuple)
    full_t = (full,) if scalar else full
    reps = []
    for j in range(n_blocks):
        keep = torch.ones(n_blocks, dtype=torch.bool)
        keep[j] = False
        r = statistic(keep)
        reps.append((r,) if scalar else r)
    errs = []
    for i in range(len(full_t)):
        vals = [r[i] for r in reps]
        mean = sum(vals) / n_blocks
        errs.append(math.sqrt((n_blocks - 1) / n_blocks * sum((v - mean) ** 2 for v in vals)))
    return (full, errs[0]) if scalar else (full_t, tuple(errs))


def ustat_stderr(Q: torch.Tensor, W: torch.Tensor | None = None) -> float:
    """Standard error of the order-2 U-statistic ``U = sum_{j != k} W_jk Q_jk / sum_{j != k} W_jk`` over ``n``
    independent blocks, by the Hoeffding decomposition (docs/theory.md §6.5):
    ``Var U = (4 (n - 2) zeta_1 + 2 zeta_2) / (n (n - 1))`` with ``zeta_1 = Cov(Q_12, Q_13)`` and
    ``zeta_2 = Var Q_12``, each estimated without bias from disjoint index sets and floored at 0.
    The delete-one-block jackknife of ``U`` counts ``zeta_2`` about twice, so it is ``sqrt 2`` too large when the
    truth is small against the noise (a degenerate U-statistic), which is where the gradient part usually lives.

    ``Q, W: [n, n]`` symmetric (``W`` defaults to ones; the diagonal is ignored); needs ``n >= 4``."""
    n = Q.shape[0]
    if n < 4:
        raise ValueError(f"ustat_stderr needs at least 4 blocks, got {n}")
    off = 1 - torch.eye(n, dtype=torch.float64, device=Q.device)
    W = torch.ones_like(off) if W is None else W.to(torch.float64)
    W = W * off
    P = W * Q.to(torch.float64) * off

    def sums(A):   # over ordered index sets: pairs (j, k), triples sharing j, disjoint quadruples
        total, rows, frob = A.sum(), A.sum(1), A.pow(2).sum()
        return frob, rows.pow(2).sum() - frob, total**2 - 4 * rows.pow(2).sum() + 2 * frob

    (p2, p1, p0), (w2, w1, w0) = sums(P), sums(W)
    s2, s1, s0 = float(p2 / w2), float(p1 / w1), float(p0 / w0)
    var = (4 * (n - 2) * max(s1 - s0, 0.0) + 2 * max(s2 - s0, 0.0)) / (n * (n - 1))
    return math.sqrt(var)
