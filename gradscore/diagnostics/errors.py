"""Public per-time error diagnostics: ``gradient_error``, ``solenoidal_error``, ``l2_error``.

All take ``(score_fn, sde, x0, t)`` with ``score_fn(x [B, *D], t [B]) -> [B, *D]``, data ``x0 [N, *D]``
and ``t`` a float / 0-dim tensor (returns one ``Estimate``) or a grid (a list or 1-D tensor; returns a
list of ``Estimate``). Defaults need no tuning; see ``projection.py`` for the estimator.
"""
from __future__ import annotations

import torch

from ..sde import SDE
from .estimate import Estimate
from .neural import critic_gradient_error
from .points import as_time, evaluate, noisy_points, time_grid
from .projection import feature_decomposition

__all__ = ["gradient_error", "solenoidal_error", "l2_error", "METHODS"]

METHODS = ("features", "critic")
MAX_FEATURE_DIM = 64


def _per_time(fn, t):
    grid = time_grid(t)
    return fn(as_time(t)) if grid is None else [fn(tk) for tk in grid]


def _check(method, x0: torch.Tensor, allowed=METHODS) -> str:
    """The method to use: ``None`` means ``"features"`` for ``d <= 64``, ``"critic"`` above."""
    if method is None:
        return "features" if x0[0].numel() <= MAX_FEATURE_DIM else "critic"
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed} (or None for the default), got {method!r}")
    return method


def gradient_error(score_fn, sde: SDE, x0: torch.Tensor, t, *, method: str | None = None, linear: str = "cv",
                   num_points: int | None = None, generator: torch.Generator | None = None, **kw):
    """``||Pi_G e_t||^2_{p_t}``, the observable part of the score error, without the true score.

    ``method="features"`` (default for ``d <= 64``): closed-form projection on a feature dictionary
    (``projection.feature_decomposition``) with the Stein / DSM / control-variate linear term
    (``linear="cv"`` default, ``"stein"``, ``"dsm"``); ``value`` is the cross-block statistic, unbiased for
    the projection onto the feature span (it can be slightly negative when the truth is ~0), and
    ``extra["lower_bound"]`` is the honest held-out J of THEORY 6.2.
    ``method="critic"`` (default above ``d = 64``, images): held-out J of a fitted neural critic
    (``neural.critic_gradient_error``; extra keywords ``critic``, ``steps``, ``batch_size``, ``lr``), a lower
    bound; ``linear`` is ignored (DSM residual).
    """
    method = _check(method, x0)
    if method == "critic":
        return _per_time(lambda tk: critic_gradient_error(score_fn, sde, x0, tk, num_points=num_points,
                                                          generator=generator, **kw), t)
    return _per_time(lambda tk: feature_decomposition(score_fn, sde, x0, tk, linear=linear, num_points=num_points,
                                                      generator=generator, **kw)["gradient"], t)


def solenoidal_error(score_fn, sde: SDE, x0: torch.Tensor, t, *, method: str = "features",
                     num_points: int | None = None, generator: torch.Generator | None = None, **kw):
    """``||Pi_S e_t||^2 = E|s_theta - grad U*|^2`` (noise-free: only the model is evaluated; features only)."""
    _check(method, x0, ("features",))
    return _per_time(lambda tk: feature_decomposition(score_fn, sde, x0, tk, num_points=num_points,
                                                      generator=generator, **kw)["solenoidal"], t)


def _exact_l2(score_fn, true_score, sde, x0, t, n_noise, generator):
    xt, _ = noisy_points(sde, x0, t, n_noise, generator)
    err = (evaluate(score_fn, xt, t).to(torch.float64) - evaluate(true_score, xt, t).to(torch.float64))
    sq = err.reshape(n_noise, x0.shape[0], -1).pow(2).sum(-1).mean(0)        # per data point (noises averaged)
    return Estimate(float(sq.mean()), float(sq.std() / sq.numel() ** 0.5),
                    {"t": float(t), "num_points": int(xt.shape[0]), "exact": True})


def l2_error(score_fn, sde: SDE, x0: torch.Tensor, t, true_score=None, *, num_points: int | None = None,
             generator: torch.Generator | None = None, **kw):
    """``||e_t||^2_{p_t}``: exact Monte Carlo ``E|s_theta - true_score|^2`` when ``true_score(x, t)`` is given,
    else ``gradient_error + solenoidal_error`` (Pythagoras, THEORY 2) from one shared decomposition."""
    if true_score is not None:
        n_noise = max(1, -(-(num_points or 2**14) // x0.shape[0]))
        return _per_time(lambda tk: _exact_l2(score_fn, true_score, sde, x0, tk, n_noise, generator), t)
    return _per_time(lambda tk: feature_decomposition(score_fn, sde, x0, tk, num_points=num_points,
                                                      generator=generator, **kw)["l2"], t)
