"""Public per-time error diagnostics: ``decompose`` (both parts at once), ``gradient_error``,
``solenoidal_error``, ``l2_error`` (docs/theory.md §2 and §6).

All take ``(score_fn, sde, x0, t, **cond)`` with ``score_fn(x [B, *D], t [B], **cond) -> [B, *D]``, data
``x0 [N, *D]``, per-sample conditioning ``cond`` (``[N, ...]`` tensors aligned with ``x0``, e.g.
``class_labels=y``) and ``t`` a float / 0-dim tensor (one result) or a grid (a list or 1-D tensor; a list).

Methods: ``"neural"`` (default at every dimension; ``neural.py``: noise-free projection of the model onto
gradient fields, then a critic on what is left) and ``"features"`` (closed form on a feature dictionary,
``projection.py``; for ``d <= 32``, where its dictionary holds every linear gradient field). ``"critic"`` is
accepted as another name of ``"neural"``.
"""
from __future__ import annotations

import math

import torch

from ..sde import SDE
from .estimate import Estimate
from .features import MAX_FEATURE_DIM
from .neural import neural_decomposition
from .points import as_time, check_cond, evaluate, noisy_points, repeat_cond, time_grid
from .projection import feature_decomposition

__all__ = ["decompose", "gradient_error", "solenoidal_error", "l2_error", "METHODS"]

METHODS = ("neural", "features", "critic")


def _per_time(fn, t):
    grid = time_grid(t)
    return fn(as_time(t)) if grid is None else [fn(tk) for tk in grid]


def _method(method: str | None, x0: torch.Tensor) -> str:
    if method is None or method == "critic":
        return "neural"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (or None for the default 'neural'), got {method!r}")
    if method == "features" and x0[0].numel() > MAX_FEATURE_DIM:
        raise ValueError(f"method='features' holds every linear gradient field only up to d = {MAX_FEATURE_DIM} "
                         f"(got d = {x0[0].numel()}); use method='neural'")
    return method


def _combine(parts: list[tuple[float, dict]]) -> dict:
    """Label-frequency weighted average of per-label decompositions (independent: errors add in quadrature)."""
    out = {}
    for key in parts[0][1]:
        value = sum(w * p[key].value for w, p in parts)
        se = math.sqrt(sum((w * p[key].stderr) ** 2 for w, p in parts))
        out[key] = Estimate(value, se, {"per_label": [p[key].to_dict() for _, p in parts]})
    return out


def _decompose_at(score_fn, sde, x0, t, method, true_score, num_points, generator, cond, kw):
    if cond:
        # the error of a conditional model is decomposed per condition, in L^2(p_t(. | y)): the networks and the
        # affine fits see x only, so conditions are grouped; discrete labels (integer tensors [N]) are supported
        bad = [k for k, v in cond.items() if v.dim() != 1 or v.is_floating_point() or v.is_complex()]
        if bad:
            raise NotImplementedError(f"diagnostics decompose a conditional model per discrete label; conditioning "
                                      f"{bad} is not an integer tensor [N] (for continuous conditioning, such as "
                                      "text embeddings, wrap the model at fixed conditions)")
        keys = torch.stack([v.to(x0.device) for v in cond.values()], 1)
        groups, inverse = torch.unique(keys, dim=0, return_inverse=True)
        parts = []
        for j in range(groups.shape[0]):
            idx = (inverse == j).nonzero().flatten()
            c = {k: v[idx.to(v.device)] for k, v in cond.items()}
            fixed = {k: v[:1] for k, v in c.items()}

            def cond_score(x, tt, fixed=fixed, fn=score_fn):
                return fn(x, tt, **{k: v.expand(x.shape[0], *v.shape[1:]) for k, v in fixed.items()})

            true_j = None
            if true_score is not None:
                def true_j(x, tt, fixed=fixed):
                    return true_score(x, tt, **{k: v.expand(x.shape[0], *v.shape[1:]) for k, v in fixed.items()})
            parts.append((idx.numel() / x0.shape[0],
                          _decompose_at(cond_score, sde, x0[idx], t, method, true_j, num_points, generator, {}, kw)))
        return _combine(parts)
    if method == "neural":
        return neural_decomposition(score_fn, sde, x0, t, num_points=num_points, true_score=true_score,
                                    generator=generator, **kw, **cond)
    return feature_decomposition(score_fn, sde, x0, t, num_points=num_points, true_score=true_score,
                                 generator=generator, **kw)


def decompose(score_fn, sde: SDE, x0: torch.Tensor, t, *, method: str | None = None, true_score=None,
              num_points: int | None = None, generator: torch.Generator | None = None, options: dict | None = None,
              **cond):
    """``{"gradient": ||Pi_G e_t||^2, "solenoidal": ||Pi_S e_t||^2, "l2": ||e_t||^2}`` as ``Estimate`` values, from
    one decomposition at each time (without the true score; ``l2`` is then gradient + solenoidal, Pythagoras).

    Args:
        method: ``None`` / ``"neural"`` or ``"features"`` (module docstring).
        true_score: optional ``(x, t, **cond) -> [B, *D]``; makes ``l2`` exact Monte Carlo.
        num_points: points of ``p_t`` where the model is evaluated.
        generator: on ``x0``'s device; every draw uses it.
        options: keywords of the method's function (``neural_decomposition``: ``steps``, ``path_nodes``,
            ``critic``...; ``feature_decomposition``: ``features``, ``linear``...).
    """
    method = _method(method, x0)
    check_cond(cond, x0.shape[0])
    kw = dict(options or {})
    return _per_time(lambda tk: _decompose_at(score_fn, sde, x0, tk, method, true_score, num_points, generator,
                                              cond, kw), t)


def _part(name, score_fn, sde, x0, t, method, num_points, generator, options, cond):
    out = decompose(score_fn, sde, x0, t, method=method, num_points=num_points, generator=generator,
                    options=options, **cond)
    return out[name] if isinstance(out, dict) else [o[name] for o in out]


def gradient_error(score_fn, sde: SDE, x0: torch.Tensor, t, *, method: str | None = None,
                   num_points: int | None = None, generator: torch.Generator | None = None,
                   options: dict | None = None, **cond):
    """``||Pi_G e_t||^2_{p_t}``, the observable part of the score error, without the true score (``decompose``)."""
    return _part("gradient", score_fn, sde, x0, t, method, num_points, generator, options, cond)


def solenoidal_error(score_fn, sde: SDE, x0: torch.Tensor, t, *, method: str | None = None,
                     num_points: int | None = None, generator: torch.Generator | None = None,
                     options: dict | None = None, **cond):
    """``||Pi_S e_t||^2 = ||Pi_S s_theta||^2``, from the model's values alone (no noise, no true score)."""
    return _part("solenoidal", score_fn, sde, x0, t, method, num_points, generator, options, cond)


def _exact_l2(score_fn, true_score, sde, x0, t, n_noise, generator, cond):
    xt, _ = noisy_points(sde, x0, t, n_noise, generator)
    c = repeat_cond(cond, n_noise)
    err = (evaluate(score_fn, xt, t, **c).to(torch.float64) - evaluate(true_score, xt, t, **c).to(torch.float64))
    sq = err.reshape(n_noise, x0.shape[0], -1).pow(2).sum(-1).mean(0)        # per data point (noises averaged)
    return Estimate(float(sq.mean()), float(sq.std() / sq.numel() ** 0.5),
                    {"t": float(t), "num_points": int(xt.shape[0]), "exact": True})


def l2_error(score_fn, sde: SDE, x0: torch.Tensor, t, true_score=None, *, method: str | None = None,
             num_points: int | None = None, generator: torch.Generator | None = None,
             options: dict | None = None, **cond):
    """``||e_t||^2_{p_t}``: exact Monte Carlo ``E|s_theta - true_score|^2`` when ``true_score(x, t)`` is given,
    else gradient + solenoidal part (Pythagoras, docs/theory.md §2) from one ``decompose``."""
    if true_score is not None:
        check_cond(cond, x0.shape[0])
        n_noise = max(1, -(-(num_points or 2**14) // x0.shape[0]))
        return _per_time(lambda tk: _exact_l2(score_fn, true_score, sde, x0, tk, n_noise, generator, cond), t)
    return _part("l2", score_fn, sde, x0, t, method, num_points, generator, options, cond)
