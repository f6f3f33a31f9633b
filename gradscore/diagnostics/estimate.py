"""The value every diagnostic returns: a Monte Carlo estimate with its standard error."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Estimate", "jackknife"]


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
