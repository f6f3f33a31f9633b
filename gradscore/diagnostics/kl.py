"""KL bounds for the reverse SDE (docs/theory.md §4).

``KL(p_0 || q_0) <= KL(p_T || q_T) + 1/2 int_0^T g(t)^2 ||Pi_G e_t||^2 dt``   (gradient bound)
``KL(p_0 || q_0) <= KL(p_T || q_T) + 1/2 int_0^T g(t)^2 ||e_t||^2 dt``        (Girsanov bound)

The integrals are trapezoid rules on a time grid. Default grid: ``n_times = 16`` points
``t_k = t_min + (T - t_min) (k / 15)^2``, quadratic so that the small times, where the errors are
largest, are resolved; the integral starts at ``sde.t_min``, as sampling does.
Prior term ``KL(p_T || N(0, prior_std^2 I))``: exact Monte Carlo ``E[log p_T - log prior]`` when
``log_prob_T(x) -> [B]`` is given, else the convexity bound ``E_x0 KL(N(alpha_T x0, sigma_T^2 I) || prior)``
(closed form). Since ``Pi_G`` is an orthogonal projection, the gradient integrand is capped at the L2
integrand (``min``), so the gradient bound is never above the Girsanov bound; it is *not* floored at 0,
so for a zero-effect perturbation it stays an unbiased estimate of 0 and the bound equals the prior term
within its standard error.
"""
from __future__ import annotations

import math

import torch

from ..sde import SDE
from .errors import decompose, l2_error
from .estimate import Estimate

__all__ = ["kl_bounds", "default_times", "prior_kl", "trapezoid_weights"]


def default_times(sde: SDE, n_times: int = 16) -> torch.Tensor:
    """``t_k = t_min + (T - t_min) (k / (n - 1))^2``, ``k = 0..n-1`` (float64)."""
    u = torch.linspace(0, 1, n_times, dtype=torch.float64)
    return sde.t_min + (sde.T - sde.t_min) * u**2


def trapezoid_weights(times: torch.Tensor) -> torch.Tensor:
    """Weights ``w`` with ``sum_k w_k f(t_k) = trapezoid integral`` (``times`` increasing)."""
    t = torch.as_tensor(times, dtype=torch.float64)
    if t.numel() < 2 or not torch.all(t[1:] > t[:-1]):
        raise ValueError("times must be an increasing grid of at least 2 points")
    dt = t[1:] - t[:-1]
    w = torch.zeros_like(t)
    w[:-1] += dt / 2
    w[1:] += dt / 2
    return w


def prior_kl(sde: SDE, x0: torch.Tensor, log_prob_T=None, generator: torch.Generator | None = None,
             n_noise: int = 4) -> Estimate:
    """``KL(p_T || prior)``: exact MC with ``log_prob_T``, else the convexity upper bound."""
    x0 = x0.reshape(x0.shape[0], -1).to(torch.float64)
    T = torch.tensor(float(sde.T), dtype=torch.float64)
    a, s, s0 = float(sde.alpha(T)), float(sde.sigma(T)), float(sde.prior_std())
    d = x0.shape[1]
    if log_prob_T is None:
        per = 0.5 * (d * s**2 / s0**2 + a**2 * x0.pow(2).sum(1) / s0**2 - d + 2 * d * math.log(s0 / s))
        kind = "convexity_bound"
    else:
        xT, _ = sde.perturb(x0.repeat(n_noise, 1), T, generator=generator)
        per = (log_prob_T(xT).to(torch.float64) - sde.prior_log_prob(xT)).reshape(n_noise, -1).mean(0)
        kind = "exact"
    return Estimate(float(per.mean()), float(per.std() / per.numel() ** 0.5), {"kind": kind})


def kl_bounds(score_fn, sde: SDE, x0: torch.Tensor, times=None, *, true_score=None, log_prob_T=None,
              method: str | None = None, num_points: int | None = None, generator: torch.Generator | None = None,
              options: dict | None = None, **cond) -> dict:
    """Gradient-only and Girsanov upper bounds on ``KL(p_0 || q_0)`` of the reverse SDE driven by ``score_fn``.

    Args:
        times: increasing grid (default ``default_times(sde)``).
        true_score: ``(x, t, **cond) -> [B, *D]``; when given, the L2 integrand is exact Monte Carlo.
        log_prob_T: ``x [B, *D] -> [B]``, ``log p_T``; makes the prior term exact.
        method, num_points, options: of ``decompose`` (one decomposition per time gives both parts).
        cond: per-sample conditioning ``[N, ...]`` aligned with ``x0``.
    Returns:
        ``{"girsanov": Estimate, "gradient": Estimate, "prior": Estimate, "times": [...],
        "integrand_girsanov": [...], "integrand_gradient": [...], "integrand_*_stderr": [...],
        "gradient_error": [Estimate], "solenoidal_error": [Estimate], "l2_error": [Estimate]}`` (integrand =
        ``1/2 g(t)^2 ||.||^2``). Without ``true_score`` the L2 integrand is gradient + solenoidal part.
    """
    times = default_times(sde) if times is None else torch.as_tensor(times, dtype=torch.float64).flatten()
    w = trapezoid_weights(times)
    prior = prior_kl(sde, x0, log_prob_T, generator)
    decs = decompose(score_fn, sde, x0, times.tolist(), method=method, num_points=num_points, generator=generator,
                     options=options, **cond)
    grads = [d["gradient"] for d in decs]
    sols = [d["solenoidal"] for d in decs]
    if true_score is not None:
        l2s = l2_error(score_fn, sde, x0, times.tolist(), true_score, num_points=num_points, generator=generator,
                       **cond)
    else:
        l2s = [d["l2"] for d in decs]
    half_g2 = 0.5 * sde.g2(times).to(torch.float64)
    ig = torch.tensor([min(g.value, el.value) for g, el in zip(grads, l2s)], dtype=torch.float64) * half_g2
    il = torch.tensor([el.value for el in l2s], dtype=torch.float64) * half_g2
    se_g = torch.tensor([g.stderr for g in grads], dtype=torch.float64) * half_g2
    se_l = torch.tensor([el.stderr for el in l2s], dtype=torch.float64) * half_g2

    def bound(integrand, se):
        val = prior.value + float((w * integrand).sum())
        err = math.sqrt(prior.stderr**2 + float(((w * se) ** 2).sum()))
        return Estimate(val, err, {"integral": float((w * integrand).sum())})

    return {
        "girsanov": bound(il, se_l), "gradient": bound(ig, se_g), "prior": prior,
        "times": times.tolist(), "integrand_girsanov": il.tolist(), "integrand_gradient": ig.tolist(),
        "integrand_girsanov_stderr": se_l.tolist(), "integrand_gradient_stderr": se_g.tolist(),
        "gradient_error": grads, "solenoidal_error": sols, "l2_error": l2s,
    }
