"""Denoising score matching, the L2 objective (docs/theory.md §7).

``loss(x0) = lambda(t) |s_theta(x_t, t | c) + eps / sigma_t|^2`` per sample, with ``t ~ sde.sample_time``
(uniform on ``[t_min, 1]``; lognormal in ``sigma`` for ``EDMSDE``), ``x_t = alpha_t x0 + sigma_t eps``.
Its expectation at fixed ``t`` is ``lambda(t) (||e_t||^2 + const(t))``; with a condition ``c`` (``**cond``)
the same holds for the conditional score ``grad log p_t(x | c)``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..parametrisation import check_cond
from ..sde import SDE, broadcast_to, time_tensor
from .base import Objective
from .hyperparameters import validate
from .weighting import Weighting, resolve_weighting, weight

__all__ = ["DSMLoss", "draw_perturbation", "residual"]


def draw_perturbation(sde: SDE, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t [B], x_t, eps)``: draws ``t ~ sde.sample_time`` unless given (float or ``[B]``), then ``x_t``.

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
        weighting: ``"sigma2"`` (eps-prediction, default), ``"likelihood"`` (``g^2``), ``"none"``,
            ``"min_snr"`` (min-SNR-5), ``"edm"`` (EDM's weight, needs ``sde.sigma_data``), or a callable
            ``(sde, t[B]) -> [B]`` (``weighting.min_snr(gamma)`` for another ``gamma``).
        reduction: ``"sum"`` over the dimensions of ``x`` (default) or ``"mean"`` (``1/d`` of it, the scale
            of ``F.mse_loss`` on ``eps_hat`` with ``weighting="sigma2"``).
    Call: ``objective(model, x0, t=None, noise=None, generator=None, **cond) -> [B]`` (unreduced over
    the batch; the caller reduces), where ``model(x, t, **cond)`` returns the score. With
    ``reduction="sum"`` at the exact score ``E[loss | t] = lambda(t) (d / sigma_t^2 - E|grad log p_t|^2)``.
    """

    name = "l2"

    def __init__(self, sde: SDE, weighting: str | Weighting = "sigma2", reduction: str = "sum"):
        self.hparams = validate(type(self).__name__, {"weighting": weighting, "reduction": reduction})
        self.sde, self.reduction = sde, reduction
        self.weighting = resolve_weighting(weighting)

    def __call__(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 **cond: Any) -> torch.Tensor:
        check_cond(cond, x0.shape[0], self.name)
        t, xt, eps = draw_perturbation(self.sde, x0, t, noise, generator)
        sr = residual(self.sde, model(xt, t, **cond), eps, t)             # sigma_t r
        lam = weight(self.weighting, self.sde, t) / self.sde.sigma(t) ** 2
        return self.reduce(lam * sr.flatten(1).pow(2).sum(1), x0)
