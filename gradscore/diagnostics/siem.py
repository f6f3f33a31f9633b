"""SIEM: the quadratic-variation metric of the forward-SPDE paper (Seo, "Modeling Score Approximation
Errors in Diffusion Models via Forward SPDEs", arXiv 2602.08579), a baseline predictor.

Published description only (the paper is not at hand): "the quadratic variation of the SPDE solution
projected onto a radial test function", effective "using only the initial 10% of the sampling trajectory".
Our reading, stated so it can be checked against the paper later:

1. the SPDE solution is the density of the sampler, represented by ``n_particles`` particles of the
   reverse SDE (Euler-Maruyama, ``dx = [f - g^2 s_theta] dt + g dW_bar``, from the prior at ``t = T``,
   on a uniform grid of ``steps`` steps down to ``sde.t_min``, noise on every step);
2. its projection on a radial test function is ``<rho_tau, phi> = mean_i phi(x_i)`` with
   ``phi(x) = exp(-|x|^2 / (2 d s0^2))`` (``s0`` the prior std: a Gaussian bump of the prior's scale);
3. the metric is the discrete quadratic variation ``sum_k (<rho_{k+1}, phi> - <rho_k, phi>)^2`` over the
   first ``ceil(fraction * steps)`` steps (``fraction = 0.1``: the start of sampling, near the prior);
4. if ``reference_score`` is given (the exact score, or another model), the same quantity for it, driven
   by the same Brownian increments (common random numbers), is subtracted: ``value = QV(model) - QV(ref)``.

Deterministic given ``generator``. Standard error: delete-one-group jackknife over 10 particle groups.
"""
from __future__ import annotations

import math

import torch

from ..sde import SDE, broadcast_to
from .estimate import Estimate, jackknife

__all__ = ["siem", "radial_test_function"]


def radial_test_function(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``phi(x) = exp(-|x|^2 / (2 d scale^2))`` for ``x: [B, *D]`` -> ``[B]``."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    return torch.exp(-flat.pow(2).sum(1) / (2 * flat.shape[1] * scale**2))


@torch.no_grad()
def _projections(score_fn, sde: SDE, xT: torch.Tensor, noises, ts) -> torch.Tensor:
    """``phi(x_i)`` along the trajectory, ``[n_steps + 1, B]``."""
    x, s0 = xT.clone(), sde.prior_std()
    out = [radial_test_function(x, s0)]
    B = x.shape[0]
    for k, z in enumerate(noises):
        t, h = float(ts[k]), float(ts[k + 1] - ts[k])                        # h < 0
        tt = torch.full((B,), t, dtype=x.dtype, device=x.device)
        g2 = broadcast_to(sde.g2(tt), x)
        x = x + h * (sde.drift(x, tt) - g2 * score_fn(x, tt)) + (g2 * (-h)).sqrt() * z
        out.append(radial_test_function(x, s0))
    return torch.stack(out)


def siem(score_fn, sde: SDE, shape, *, reference_score=None, steps: int = 500, fraction: float = 0.1,
         generator: torch.Generator | None = None, n_groups: int = 10, dtype=torch.float32, device=None) -> Estimate:
    """SIEM of ``score_fn`` (see the module docstring for the reading implemented).

    Args:
        shape: ``(n_particles, *D)``.
        steps: steps of the full sampling trajectory; the first ``ceil(fraction * steps)`` are used.
        reference_score: optional score whose QV is subtracted (same noises).
    Returns:
        ``Estimate`` with ``extra = {"qv_model", "qv_reference", "steps_used"}``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = shape[0]
    if n < n_groups:
        raise ValueError(f"need at least n_groups={n_groups} particles, got shape {tuple(shape)}")
    k_used = max(1, math.ceil(fraction * steps))
    ts = torch.linspace(sde.T, sde.t_min, steps + 1, dtype=torch.float64)[:k_used + 1]
    xT = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    noises = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(k_used)]
    phis = {"model": _projections(score_fn, sde, xT, noises, ts)}
    if reference_score is not None:
        phis["reference"] = _projections(reference_score, sde, xT, noises, ts)
    group = torch.arange(n) % n_groups

    def qv(vals, keep):
        m = vals[:, keep[group]].mean(1)
        return float(m.diff().pow(2).sum())

    def stat(keep):
        q = qv(phis["model"], keep)
        return q - qv(phis["reference"], keep) if "reference" in phis else q

    value, err = jackknife(stat, n_groups)
    full = torch.ones(n_groups, dtype=torch.bool)
    return Estimate(value, err, {"qv_model": qv(phis["model"], full),
                                 "qv_reference": qv(phis["reference"], full) if "reference" in phis else None,
                                 "steps_used": k_used})
