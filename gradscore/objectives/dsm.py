"""Denoising score matching, the L2 objective (docs/theory.md §7).

``loss(x0) = lambda(t) |s_theta(x_t, t) + eps / sigma_t|^2`` per sample, with ``t ~ U(t_min, 1)``,
``x_t = alpha_t x0 + sigma_t eps``. Its expectation at fixed ``t`` is ``lambda(t) (||e_t||^2 + const(t))``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..sde import SDE, broadcast_to, time_tensor
from .base import Objective
from .hyperparameters import validate
from .weighting import Weighting, resolve_weighting, weight

__all__ = ["DSMLoss", "draw_perturbation", "residual"]


def draw_perturbation(sde: SDE, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t [B], x_t, eps)``: draws ``t ~ U(t_min, 1)`` unless given (float or ``[B]``), then ``x_t``.

    ``x_t`` is computed in fp32 or wider (it is differentiated by energies and critics); ``t`` takes its dtype."""
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")
    if x0.dtype in (torch.float16, torch.bfloat16):
        x0 = x0.float()
    if t is None:
        t = sde.sample_time(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        t = time_tensor(t, x0, batch=x0.shape[0]).to(x0.dtype)
    xt, eps = sde.perturb(x0, t, noise=noise, generator=generator)
    return t, xt, eps


def residual(sde: SDE, score: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Scaled DSM residual ``sigma_t r = sigma_t s_theta + eps`` (finite as ``sigma_t -> 0``); the score
    must be shaped like ``x`` (no silent broadcasting)."""
    if score.shape != eps.shape:
        raise ValueError(f"model returned shape {tuple(score.shape)}, expected x's shape {tuple(eps.shape)}")
    return broadcast_to(sde.sigma(t), eps) * score.to(eps.dtype) + eps


class DSMLoss(Objective):
    """L2 / denoising score-matching objective.

    Args:
        sde: the forward process.
        weighting: ``"sigma2"`` (eps-prediction, default), ``"likelihood"`` (``g^2``), ``"none"``, or a
            callable ``(sde, t[B]) -> [B]``.
    Call: ``objective(model, x0, t=None, noise=None, generator=None) -> [B]`` (unreduced; the caller
    reduces), where ``model(x, t)`` returns the score. Dimensions are summed, so at the exact score
    ``E[loss | t] = lambda(t) (d / sigma_t^2 - E|grad log p_t|^2)``.
    """

    name = "l2"

    def __init__(self, sde: SDE, weighting: str | Weighting = "sigma2"):
        self.hparams = validate(type(self).__name__, {"weighting": weighting})
        self.sde = sde
        self.weighting = resolve_weighting(weighting)

    def __call__(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        t, xt, eps = draw_perturbation(self.sde, x0, t, noise, generator)
        sr = residual(self.sde, model(xt, t), eps, t)                     # sigma_t r
        lam = weight(self.weighting, self.sde, t) / self.sde.sigma(t) ** 2
        return lam * sr.flatten(1).pow(2).sum(1)
