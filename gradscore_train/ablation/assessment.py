"""One assessment of a score model on a toy mixture: sample quality and every diagnostic.

``assess(score_fn, sde, mixture, ev) -> dict`` (JSON-ready) with, for the same seeds whatever the
model (common random numbers, so differences between models are paired):

* ``quality``: ``energy_distance`` and ``sliced_wasserstein`` of ``ev.num_samples`` reverse-SDE
  samples to fresh target samples, the two-sample ``energy_distance_floor``, ``nll`` (``E_q[-log p_0]``)
  and the target ``entropy``;
* ``per_time``: on ``default_times(sde, ev.num_times)``: ``l2`` (exact, the mixture's score is known),
  ``gradient`` (``||Pi_G e_t||^2``, features estimator, no true score) and ``solenoidal = l2 - gradient``;
* ``predictors``: the scalars the correlation study ranks by. ``dsm_l2``, ``gradient``, ``solenoidal``:
  ``int sigma_t^2 ||.||^2 dt`` (the eps-prediction weighting DSM minimises; trapezoid on the grid);
  ``kl_girsanov``, ``kl_gradient``: the two KL bounds (likelihood weighting ``g^2 / 2`` plus the prior
  term); ``siem``: the SIEM baseline with the exact score as reference.
"""
from __future__ import annotations

import math

import torch

from gradscore.diagnostics import GradientFeatures, default_times, kl_bounds, siem
from gradscore.diagnostics.kl import trapezoid_weights
from gradscore.quality import toy_quality
from gradscore.sampling import sample

__all__ = ["assess", "PREDICTORS"]

PREDICTORS = ("dsm_l2", "gradient", "solenoidal", "kl_girsanov", "kl_gradient", "siem")


def _finite(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def assess(score_fn, sde, mixture, ev, samples_path: str | None = None) -> dict:
    """Assess ``score_fn(x [B, d], t [B]) -> [B, d]`` against ``mixture`` (a ``GaussianMixture``).

    Args:
        ev: an ``EvaluateConfig`` (sizes and the seed).
        samples_path: if given, the quality samples ``[num_samples, d]`` are saved there (``torch.save``).
    """
    g = torch.Generator().manual_seed(ev.seed)
    x = sample(score_fn, sde, (ev.num_samples, mixture.dim), method=ev.method, steps=ev.sample_steps, generator=g)
    if samples_path:
        torch.save(x, samples_path)
    quality = toy_quality(mixture, x, generator=torch.Generator().manual_seed(ev.seed + 1))

    g = torch.Generator().manual_seed(ev.seed + 2)
    x0 = mixture.sample(ev.num_data, generator=g)
    times = default_times(sde, ev.num_times)
    features = GradientFeatures(x0.mean(0).double(), x0.std(0).double(), poly=True, num_rff=ev.num_features, seed=ev.seed)
    true = mixture.score_fn(sde)
    kl = kl_bounds(score_fn, sde, x0, times, true_score=true, log_prob_T=lambda z: mixture.log_prob(z, sde.T, sde),
                   num_points=ev.num_points, generator=g, features=features)
    per_time = []
    for tk, ge, le in zip(kl["times"], kl["gradient_error"], kl["l2_error"]):
        per_time.append({"t": tk, "l2": le.value, "l2_stderr": le.stderr, "gradient": ge.value,
                         "gradient_stderr": ge.stderr, "solenoidal": le.value - ge.value})
    w = trapezoid_weights(times)
    sigma2 = sde.sigma(times).to(torch.float64) ** 2

    def weighted(key):
        return float((w * sigma2 * torch.tensor([r[key] for r in per_time], dtype=torch.float64)).sum())

    s = siem(score_fn, sde, (ev.siem_particles, mixture.dim), reference_score=true, steps=ev.siem_steps,
             generator=torch.Generator().manual_seed(ev.seed + 3))
    predictors = {"dsm_l2": weighted("l2"), "gradient": weighted("gradient"), "solenoidal": weighted("solenoidal"),
                  "kl_girsanov": kl["girsanov"].value, "kl_gradient": kl["gradient"].value, "siem": s.value}
    return {
        "quality": {k: _finite(float(v)) for k, v in quality.items()},
        "per_time": per_time,
        "predictors": predictors,
        "stderr": {"kl_girsanov": kl["girsanov"].stderr, "kl_gradient": kl["gradient"].stderr,
                   "kl_prior": kl["prior"].value, "siem": s.stderr},
    }
