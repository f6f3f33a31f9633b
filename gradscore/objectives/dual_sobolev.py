"""The dual-Sobolev (gradient-projected) objective (docs/theory.md §5 and §7).

    min_theta max_eta  E_t lambda(t) E[ 2 r_theta . grad psi_eta(x_t, t) - |grad psi_eta(x_t, t)|^2 ]

with the DSM residual ``r_theta = s_theta(x_t, t) + eps / sigma_t``. For fixed ``theta`` the inner
maximum is ``E_t lambda(t) ||Pi_G e_t||^2`` (the gradient part of the score error, the only part a
sampler sees), attained at ``grad psi = Pi_G e_t``. ``l2_weight > 0`` adds ``l2_weight`` times the
DSM loss (``"l2+dual_sobolev"``: ``||e||^2 + ||Pi_G e||^2``, up-weighting what sampling sees).
Both players move with one backward: ``grad psi`` passes through a gradient reversal, so one optimizer
over both parameter sets performs simultaneous descent-ascent; ``critic_loss`` (score detached) serves
the ``n_critic - 1`` extra critic steps of ``phases()``. Alone, the score's solenoidal part has no
restoring force and the last iterate wanders: sample an average of the iterates (an EMA of the
weights), with gradient clipping and warm-up. Measurements: BENCHMARKS.md, "dual_sobolev stability (toy)".
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..critic import critic_objective
from ..parametrisation import check_cond
from ..sde import SDE, broadcast_to
from .base import Objective, check_critic_prepared
from .dsm import draw_perturbation, residual
from .hyperparameters import validate
from .weighting import Weighting, resolve_weighting, weight

__all__ = ["DualSobolevLoss", "reverse_gradient"]


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is negated (min-max in one backward)."""
    return _ReverseGradient.apply(x)


class DualSobolevLoss(Objective):
    """Gradient-projected min-max objective with a scalar critic.

    Args:
        sde: the forward process.
        critic: a ``gradscore.Critic`` (or any module ``(x, t) -> grad_x psi`` shaped like ``x``,
            possibly DDP-wrapped). Read through ``self.critic`` at every call, so a driver may
            replace it by its prepared/wrapped version.
        weighting: ``lambda(t)``: ``"sigma2"`` (default; with ``psi = psi~ / sigma_t`` every term
            is of order one at every ``t``), ``"likelihood"`` (``g^2``), ``"none"``, or a callable.
        l2_weight: weight of the added DSM term (0: projection only, the solenoidal part is left free).
            Sets the name: ``"dual_sobolev"`` when 0, else ``"l2+dual_sobolev"``.
        n_critic: critic updates per score step: the joint step updates the critic once, and
            ``phases()`` adds ``n_critic - 1`` critic-only steps before it.
        reduction: ``"sum"`` (default) or ``"mean"`` over the dimensions of ``x``, as for ``DSMLoss``.
    Call: ``objective(model, x0, t=None, noise=None, generator=None, **cond) -> [B]``, per sample
    ``lambda(t) (2 r . g - |g|^2) + l2_weight lambda(t) |r|^2`` with ``g = grad psi(x_t, t)`` passed
    through ``reverse_gradient``. Its value (with ``l2_weight=0``) estimates ``lambda ||Pi_G e||^2``
    from below as the critic improves. ``cond`` reaches both ``model(x_t, t, **cond)`` and
    ``critic(x_t, t, **cond)`` (the projection is then that of the conditional error, per condition).
    In a multi-process run with a DDP-wrapped score model the critic must be wrapped too
    (``gradscore.objectives.prepare``); an unwrapped one raises (``check_critic_prepared``).
    """

    def __init__(self, sde: SDE, critic: Callable, weighting: str | Weighting = "sigma2", l2_weight: float = 0.0,
                 n_critic: int = 1, reduction: str = "sum"):
        if critic is None:
            raise ValueError("DualSobolevLoss needs a critic, e.g. gradscore.Critic(TimeMLP(d, out_dim=1), sde)")
        if not callable(critic):
            raise TypeError(f"critic must be a module (x, t) -> grad psi, got {type(critic).__name__}")
        hparams = validate(type(self).__name__, {"weighting": weighting, "n_critic": n_critic, "l2_weight": l2_weight,
                                                 "reduction": reduction})
        self.sde, self.critic, self.reduction = sde, critic, reduction
        self.weighting = resolve_weighting(weighting)
        self.l2_weight, self.n_critic = hparams["l2_weight"], hparams["n_critic"]
        self.name = "dual_sobolev" if self.l2_weight == 0 else "l2+dual_sobolev"
        if self.l2_weight == 0:             # "dual_sobolev" is the projection alone: no l2_weight hyperparameter
            del hparams["l2_weight"]
        self.hparams = hparams

    # ------------------------------------------------------------------------------------------
    def _critic_gradient(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        g = self.critic(xt, t, **cond)
        if not isinstance(g, torch.Tensor) or g.shape != xt.shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"critic must return grad_x psi shaped like x {tuple(xt.shape)}, got {shape}; wrap a scalar "
                "backbone as gradscore.Critic(backbone, sde)")
        return g.to(xt.dtype)

    def _terms(self, model, x0, t, noise, generator, detach_score: bool, cond: dict[str, Any]):
        check_cond(cond, x0.shape[0], self.name)
        check_critic_prepared(self.critic, self.name, model)
        t, xt, eps = draw_perturbation(self.sde, x0, t, noise, generator)
        if detach_score:
            with torch.no_grad():
                score = model(xt, t, **cond)
        else:
            score = model(xt, t, **cond)
        sigma = self.sde.sigma(t)
        sr = residual(self.sde, score, eps, t)                            # sigma_t r
        g = self._critic_gradient(xt, t, cond)
        lam = weight(self.weighting, self.sde, t) / sigma**2              # lambda / sigma^2
        return t, sr, g, broadcast_to(sigma, xt), lam

    def __call__(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 **cond: Any) -> torch.Tensor:
        t, sr, g, sigma, lam = self._terms(model, x0, t, noise, generator, False, cond)
        loss = lam * critic_objective(sr, sigma * reverse_gradient(g))   # sigma_t^2 (2 r.g - |g|^2)
        if self.l2_weight > 0:
            loss = loss + self.l2_weight * lam * sr.flatten(1).pow(2).sum(1)
        return self.reduce(loss, x0)

    def critic_loss(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    **cond: Any) -> torch.Tensor:
        """``-lambda(t) (2 r . g - |g|^2)`` per sample, ``[B]``, with the score detached (computed
        under ``no_grad``, so a DDP-wrapped model is not left waiting for a backward)."""
        t, sr, g, sigma, lam = self._terms(model, x0, t, noise, generator, True, cond)
        return self.reduce(-lam * critic_objective(sr, sigma * g), x0)

    def projection(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   **cond: Any) -> torch.Tensor:
        """Diagnostic ``lambda(t) (2 r . g - |g|^2)`` per sample without gradients; its mean over
        held-out samples is an unbiased estimate of a lower bound on ``lambda ||Pi_G e_t||^2``."""
        with torch.no_grad():
            return -self.critic_loss(model, x0, t=t, noise=noise, generator=generator, **cond)
