"""Time weightings ``lambda(t)`` of score-matching objectives (docs/theory.md §7)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..sde import SDE

__all__ = ["resolve_weighting", "WEIGHTINGS"]

Weighting = Callable[[SDE, torch.Tensor], torch.Tensor]

# lambda(t) for each name: "sigma2" is eps-prediction (sigma_t^2); "likelihood" is g(t)^2, whose
# integral of the DSM loss is the Girsanov bound; "none" is 1.
WEIGHTINGS: dict[str, Weighting] = {
    "sigma2": lambda sde, t: sde.sigma(t) ** 2,
    "likelihood": lambda sde, t: sde.g2(t),
    "none": lambda sde, t: torch.ones_like(t),
}


def resolve_weighting(weighting: str | Weighting) -> Weighting:
    """A name from ``WEIGHTINGS`` or a callable ``(sde, t[B]) -> [B]``; returns the callable."""
    if callable(weighting):
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)} or a callable (sde, t) -> [B], "
                         f"got {weighting!r}")
    return WEIGHTINGS[weighting]


def weight(weighting_fn: Weighting, sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """``lambda(t)``, shape ``[B]`` like ``t`` (a callable returning another shape raises)."""
    w = weighting_fn(sde, t)
    if w.shape != t.shape:
        raise ValueError(f"weighting returned shape {tuple(w.shape)}, expected t's shape {tuple(t.shape)}")
    return w
