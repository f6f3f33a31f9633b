"""Time weightings ``lambda(t)`` of score-matching objectives (THEORY section 7)."""
from __future__ import annotations

import torch

from ..sde import SDE

__all__ = ["resolve_weighting", "WEIGHTINGS"]

# lambda(t) for each name: "sigma2" is eps-prediction (sigma_t^2); "likelihood" is g(t)^2, whose
# integral of the DSM loss is the Girsanov bound; "none" is 1.
WEIGHTINGS = {
    "sigma2": lambda sde, t: sde.sigma(t) ** 2,
    "likelihood": lambda sde, t: sde.g2(t),
    "none": lambda sde, t: torch.ones_like(t),
}


def resolve_weighting(weighting):
    """A name from ``WEIGHTINGS`` or a callable ``(sde, t[B]) -> [B]``; returns the callable."""
    if callable(weighting):
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)} or a callable (sde, t) -> [B], got {weighting!r}")
    return WEIGHTINGS[weighting]


def check_nonnegative(name: str, value) -> float:
    """A loss-term weight (``l2_weight``, ``asymmetry_weight``): a number >= 0, else an error naming it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def weight(weighting_fn, sde: SDE, t: torch.Tensor) -> torch.Tensor:
    w = weighting_fn(sde, t)
    if w.shape != t.shape:
        raise ValueError(f"weighting returned shape {tuple(w.shape)}, expected t's shape {tuple(t.shape)}")
    return w
