"""Jacobian-asymmetry penalty, the quasi-conservative baseline (docs/theory.md §7).

``1/2 ||J - J^T||_F^2`` with ``J = d s_theta / d x`` is estimated by Hutchinson's trick,
``E_v 1/2 |J v - J^T v|^2`` for probes with ``E[v v^T] = I`` (Rademacher or Gaussian). For a
fixed ``v`` both products come from reverse-mode autograd (no ``backward`` inside the loss):

    u := v (a leaf requiring grad)
    J^T v = grad_x (s . u)                     (vjp, create_graph)
    J v   = grad_u (J^T u . v)                 (the vjp is linear in u: the "double-vjp" trick)

so the penalty is exact for the probe drawn and differentiable in the model's parameters.
Baseline caveat: it also penalises harmless fields, e.g. ``c J grad log p_t`` (solenoidal for
``p_t``, so invisible to every sampler) has an asymmetric Jacobian.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..double_backward import math_attention
from ..parametrisation import check_cond
from ..sde import SDE
from .base import Objective
from .dsm import draw_perturbation, residual
from .hyperparameters import PROBES, validate
from .weighting import Weighting, resolve_weighting, weight

__all__ = ["AsymmetryPenalty", "asymmetry_probe", "draw_probes", "PROBES"]


def asymmetry_probe(score: torch.Tensor, x: torch.Tensor, v: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``1/2 |J v - J^T v|^2`` per sample, ``[B]``, with ``J = d score / d x`` (per sample).

    Args:
        score: ``[B, *D]``, computed from ``x`` (``x.requires_grad`` must be true).
        x: ``[B, *D]`` the input the score was computed from.
        v: probe ``[B, *D]``.
        create_graph: keep the graph (to train through the penalty).
    """
    if not x.requires_grad:
        raise ValueError("x must require grad and the score must be computed from it")
    if score.shape != x.shape or v.shape != x.shape:
        raise ValueError(f"score {tuple(score.shape)}, x {tuple(x.shape)} and probe {tuple(v.shape)} "
                         "must have one shape")
    s = score.float() if score.dtype in (torch.float16, torch.bfloat16) else score
    v = v.to(s.dtype)
    u = v.detach().clone().requires_grad_(True)
    (jt_u,) = torch.autograd.grad(s, x, u, create_graph=True)            # J^T u (= J^T v), linear in u
    (j_v,) = torch.autograd.grad(jt_u, u, v, create_graph=create_graph)  # J v
    if not create_graph:
        jt_u = jt_u.detach()
    return 0.5 * (j_v - jt_u.to(j_v.dtype)).flatten(1).pow(2).sum(1)


def draw_probes(shape: tuple[int, ...], probe: str = "rademacher", generator: torch.Generator | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Hutchinson probes with ``E[v v^T] = I``: ``"rademacher"`` (+-1) or ``"gaussian"``."""
    if probe == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
    if probe == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


class AsymmetryPenalty(Objective):
    """DSM plus a Hutchinson-estimated Jacobian-asymmetry penalty.

    Per sample: ``lambda(t) |r|^2 + asymmetry_weight * w(t) * 1/2 |(J - J^T) v|^2`` (mean over ``probes``
    probes), ``r = s_theta + eps / sigma_t``, with the penalty's time weight ``w(t)`` set by
    ``penalty_weighting``:

    * ``"lambda_sigma2"`` (default): ``w = lambda(t) sigma_t^2``, the DSM weight times ``sigma_t^2``. The
      penalty is then that of the Jacobian of ``sigma_t^2 s_theta = alpha_t x0_hat - x_t`` (of order one
      at every ``t``, where ``J`` itself grows like ``1 / sigma_t^2``) under the DSM weighting; with
      ``lambda = sigma_t^2`` it is ``sigma_t^4 ||J - J^T||_F^2 / 2`` in expectation.
    * ``"sigma2"``: ``w = sigma_t^2`` whatever ``lambda``, the regulariser of Chao et al.,
      "Quasi-Conservative Score-based Generative Models" (2022, arXiv 2209.12753; ICML 2023 as "On
      Investigating the Conservative Property of Score-Based Generative Models"):
      ``sigma_t^2 (tr(J J^T) - tr(J J)) = sigma_t^2 ||J - J^T||_F^2 / 2``. With ``weighting="sigma2"``
      this is the loss of their 2-D examples with balancing factor ``asymmetry_weight``; their image
      code halves the DSM term, i.e. ``asymmetry_weight = 2 x`` their factor.

    Args:
        sde: the forward process.
        weighting: ``lambda(t)`` as for ``DSMLoss``.
        asymmetry_weight: weight of the penalty (>= 0; 0 is plain DSM).
        probes: Hutchinson probes per sample (each costs two extra vector-Jacobian products).
        probe: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
        penalty_weighting: ``"lambda_sigma2"`` (default) or ``"sigma2"`` (Chao et al.), see above.
        reduction: ``"sum"`` (default) or ``"mean"``: the whole per-sample loss divided by ``d``.
    Call: ``objective(model, x0, t=None, noise=None, generator=None, probe_vectors=None, **cond) -> [B]``
    (``cond`` goes to every evaluation of the model: the Jacobian is that of ``x -> s(x, t | c)``);
    ``probe_vectors: [probes, B, *D]`` overrides the draw (drawn from ``generator`` after ``t`` and
    the noise otherwise). Works under autocast (``x_t`` stays fp32, the score is upcast before
    differentiation) and under DDP: only ``autograd.grad`` is called, never ``backward``.
    """

    name = "asymmetry"

    def __init__(self, sde: SDE, weighting: str | Weighting = "sigma2", asymmetry_weight: float = 1.0,
                 probes: int = 1, probe: str = "rademacher", penalty_weighting: str = "lambda_sigma2",
                 reduction: str = "sum"):
        self.hparams = validate(type(self).__name__, {
            "weighting": weighting, "asymmetry_weight": asymmetry_weight, "probes": probes, "probe": probe,
            "penalty_weighting": penalty_weighting, "reduction": reduction})
        self.reduction = reduction
        self.sde, self.weighting = sde, resolve_weighting(weighting)
        self.asymmetry_weight, self.probes = self.hparams["asymmetry_weight"], probes
        self.probe, self.penalty_weighting = probe, penalty_weighting

    def __call__(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 probe_vectors: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        check_cond(cond, x0.shape[0], self.name)
        t, xt, eps = draw_perturbation(self.sde, x0, t, noise, generator)
        x = xt.detach().requires_grad_(True)
        with math_attention():                      # fused SDPA kernels have no double backward
            score = model(x, t, **cond)
        sigma = self.sde.sigma(t)
        lam = weight(self.weighting, self.sde, t)
        loss = lam / sigma**2 * residual(self.sde, score, eps, t).flatten(1).pow(2).sum(1)
        if self.asymmetry_weight == 0:
            return self.reduce(loss, x0)
        if probe_vectors is None:
            probe_vectors = draw_probes((self.probes, *x.shape), self.probe, generator, x.device, x.dtype)
        elif probe_vectors.shape != (self.probes, *x.shape):
            raise ValueError(f"probe_vectors must have shape {(self.probes, *x.shape)} [probes, B, *D], "
                             f"got {tuple(probe_vectors.shape)}")
        penalty = sum(asymmetry_probe(score, x, v) for v in probe_vectors) / self.probes
        penalty_weight = sigma**2 if self.penalty_weighting == "sigma2" else lam * sigma**2
        return self.reduce(loss + self.asymmetry_weight * penalty_weight * penalty, x0)
