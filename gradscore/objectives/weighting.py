"""Time weightings ``lambda(t)`` of score-matching objectives, in score space: the loss is
``lambda(t) |s_theta + eps / sigma_t|^2`` (docs/theory.md §7.1)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..sde import SDE

__all__ = ["resolve_weighting", "WEIGHTINGS", "min_snr", "edm"]

Weighting = Callable[[SDE, torch.Tensor], torch.Tensor]



def min_snr(gamma: float = 5.0) -> Weighting:
    """Min-SNR-gamma (Hang et al. 2023) in score space: ``lambda = sigma_t^2 min(1, gamma / SNR_t)`` with
    ``SNR_t = alpha_t^2 / sigma_t^2`` (the eps loss weighted by ``min(SNR, gamma) / SNR``; docs/theory.md §7.1)."""
    if not gamma > 0:
        raise ValueError(f"min_snr needs gamma > 0, got {gamma!r}")

    def weighting(sde: SDE, t: torch.Tensor) -> torch.Tensor:
        sigma2 = sde.sigma(t) ** 2
        snr = sde.alpha(t) ** 2 / sigma2
        return sigma2 * torch.clamp(gamma / snr, max=1.0)

    weighting.__name__ = f"min_snr({gamma:g})"
    return weighting


def edm(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """EDM's loss weight (Karras et al. 2022) in score space: ``lambda = alpha_t^2 sigma^2 (sigma^2 + sd^2) / sd^2``
    with ``sigma = sigma_t / alpha_t`` and ``sd = sde.sigma_data`` (``EDMSDE``, where ``alpha_t = 1``). EDM weights
    ``|D - x0|^2`` by ``(sigma^2 + sd^2) / (sigma sd)^2`` and ``D - x0 = alpha_t sigma^2 (s + eps / sigma_t)``
    (docs/theory.md §7.1), so the loss on EDM's ``F`` is ``|F - F_target|^2``, weight one at every noise level."""
    sd = getattr(sde, "sigma_data", None)
    if sd is None:
        raise ValueError(f"weighting='edm' needs a process with sigma_data (gradscore.EDMSDE), got {sde!r}")
    alpha = sde.alpha(t)
    sigma = sde.sigma(t) / alpha
    return alpha**2 * sigma**2 * (sigma**2 + sd**2) / sd**2


# lambda(t) for each name: "sigma2" is eps-prediction (sigma_t^2); "likelihood" is g(t)^2, whose
# integral of the DSM loss is the Girsanov bound; "none" is 1; "min_snr" is min-SNR-5; "edm" is EDM's.
WEIGHTINGS: dict[str, Weighting] = {
    "sigma2": lambda sde, t: sde.sigma(t) ** 2,
    "likelihood": lambda sde, t: sde.g2(t),
    "none": lambda sde, t: torch.ones_like(t),
    "min_snr": min_snr(5.0),
    "edm": edm,
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
