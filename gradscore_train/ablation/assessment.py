"""Step 3 of an ablation: assess every model with the same seeds (toy mixtures, exact score known).

``assess(score_fn, sde, mixture, ac) -> dict`` assesses one model (JSON-ready), for the same seeds
whatever the model (common random numbers, so differences between models are paired):

* ``quality``: ``energy_distance`` and ``sliced_wasserstein`` of ``ac.num_samples`` reverse-SDE
  samples to fresh target samples, the two-sample ``energy_distance_floor``, ``nll`` (``E_q[-log p_0]``)
  and the target ``entropy``;
* ``per_time``: on ``default_times(sde, ac.num_times)``: ``l2`` (exact, the mixture's score is known),
  ``gradient`` (``||Pi_G e_t||^2``, features estimator, no true score) and ``solenoidal = l2 - gradient``;
* ``predictors``: the scalars the correlation study ranks by. ``dsm_l2``, ``gradient``, ``solenoidal``:
  ``int sigma_t^2 ||.||^2 dt`` (the eps-prediction weighting DSM minimises; trapezoid on the grid);
  ``kl_girsanov``, ``kl_gradient``: the two KL bounds (likelihood weighting ``g^2 / 2`` plus the prior
  term); ``siem``: the SIEM baseline with the exact score as reference;
* ``kl_prior``: the prior term ``KL(p_T || prior)`` both bounds include (exact Monte Carlo: the
  mixture's ``log p_T`` is known);
* ``stderr``: the standard errors of ``kl_girsanov``, ``kl_gradient``, ``kl_prior`` and ``siem``.

``assess_all(ablation) -> {"runs": [...], "population": [...]}`` assesses the final checkpoint of every
finished run (the comparison) and, for the correlation study, the kept intermediate checkpoints and the
perturbed exact scores of ``population.py``. Every assessment is cached as JSON next to what it
assesses, keyed on the ``AssessmentConfig``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict

import torch

from gradscore.diagnostics import GradientFeatures, default_times, kl_bounds, siem
from gradscore.diagnostics.kl import trapezoid_weights
from gradscore.quality import toy_quality
from gradscore.sampling import sample

from ..build import build_sde, load_trained
from ..checkpoint import checkpoint_dirs, read_step
from ..data import build_source, toy_mixture
from .config import Ablation, AssessmentConfig, RunSpec, write_json
from .population import perturbed_scores
from .runs import final_metrics_path, segments

__all__ = ["assess", "assess_images", "assess_all", "PREDICTORS", "IMAGE_PREDICTORS"]

PREDICTORS = ("dsm_l2", "gradient", "solenoidal", "kl_girsanov", "kl_gradient", "siem")
# images: no exact score, so SIEM without a reference; bits/dim (NaN when assessment.likelihood_samples is 0)
IMAGE_PREDICTORS = ("dsm_l2", "gradient", "solenoidal", "kl_girsanov", "kl_gradient", "siem", "bits_per_dim")


def image_siem(score_fn, sde, shape, ac: AssessmentConfig) -> tuple[float, float, float]:
    """``(value, stderr, seconds)`` of SIEM for an image model: ``ac.siem_particles`` particles of ``shape``, no
    reference (no exact score on images), the same seed for every model (common random numbers)."""
    t0 = time.perf_counter()
    s = siem(score_fn, sde, (ac.siem_particles, *shape), steps=ac.siem_steps,
             generator=torch.Generator().manual_seed(ac.seed + 5))
    return s.value, s.stderr, time.perf_counter() - t0


def _with_siem(result: dict, cache: str, load, shape, ac: AssessmentConfig) -> dict:
    """An image assessment cached before SIEM was a predictor gets it now (``load()`` -> ``(sde, score callable)``,
    called only then), and its cache file is rewritten; one that has it is returned as it is."""
    if "siem" in result["predictors"]:
        return result
    sde, score_fn = load()
    result["predictors"]["siem"], result["stderr"]["siem"], result["cost_s"]["siem"] = image_siem(score_fn, sde,
                                                                                                  shape, ac)
    write_json(cache, result)
    return result


def _finite(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def assess(score_fn, sde, mixture, ac: AssessmentConfig, samples_path: str | None = None) -> dict:
    """Assess ``score_fn(x [B, d], t [B]) -> [B, d]`` against ``mixture`` (a ``GaussianMixture``).

    Args:
        ac: an ``AssessmentConfig`` (sizes and the seed).
        samples_path: if given, the quality samples ``[num_samples, d]`` are saved there (``torch.save``).
    """
    g = torch.Generator().manual_seed(ac.seed)
    x = sample(score_fn, sde, (ac.num_samples, mixture.dim), method=ac.method, steps=ac.sample_steps, generator=g)
    if samples_path:
        torch.save(x, samples_path)
    quality = toy_quality(mixture, x, generator=torch.Generator().manual_seed(ac.seed + 1))

    g = torch.Generator().manual_seed(ac.seed + 2)
    x0 = mixture.sample(ac.num_data, generator=g)
    times = default_times(sde, ac.num_times)
    features = GradientFeatures(x0.mean(0).double(), x0.std(0).double(), poly=True, num_rff=ac.num_features,
                                seed=ac.seed)
    true = mixture.score_fn(sde)
    kl = kl_bounds(score_fn, sde, x0, times, true_score=true, log_prob_T=lambda z: mixture.log_prob(z, sde.T, sde),
                   method="features", num_points=ac.num_points, generator=g, options={"features": features})
    per_time, predictors = _per_time_and_predictors(kl, sde, times)
    s = siem(score_fn, sde, (ac.siem_particles, mixture.dim), reference_score=true, steps=ac.siem_steps,
             generator=torch.Generator().manual_seed(ac.seed + 3))
    predictors["siem"] = s.value
    return {
        "quality": {k: _finite(float(v)) for k, v in quality.items()},
        "per_time": per_time,
        "predictors": predictors,
        "kl_prior": kl["prior"].value,
        "stderr": {"kl_girsanov": kl["girsanov"].stderr, "kl_gradient": kl["gradient"].stderr,
                   "kl_prior": kl["prior"].stderr, "siem": s.stderr},
    }


def _per_time_and_predictors(kl, sde, times) -> tuple[list, dict]:
    per_time = []
    for tk, ge, se, le in zip(kl["times"], kl["gradient_error"], kl["solenoidal_error"], kl["l2_error"]):
        # the solenoidal part is its own (noise-free) estimate, never L2 minus the gradient estimate
        per_time.append({"t": tk, "l2": le.value, "l2_stderr": le.stderr, "gradient": ge.value,
                         "gradient_stderr": ge.stderr, "solenoidal": se.value, "solenoidal_stderr": se.stderr})
    w = trapezoid_weights(times)
    sigma2 = sde.sigma(times).to(torch.float64) ** 2

    def weighted(key):
        return float((w * sigma2 * torch.tensor([r[key] for r in per_time], dtype=torch.float64)).sum())

    predictors = {"dsm_l2": weighted("l2"), "gradient": weighted("gradient"), "solenoidal": weighted("solenoidal"),
                  "kl_girsanov": kl["girsanov"].value, "kl_gradient": kl["gradient"].value}
    return per_time, predictors


def assess_images(score_fn, sde, source, ac: AssessmentConfig, eval_cfg, samples_path: str | None = None) -> dict:
    """Assess an image model ``score_fn(x [B, *D], t [B]) -> [B, *D]`` on the data ``source`` (no exact score).

    * ``quality``: ``classifier_fd`` (the Frechet distance in the features of ``gradscore.quality``'s digit
      classifier) of ``ac.num_samples`` samples, its two-sample ``classifier_fd_floor`` and the classes the samples
      depict (``class_coverage``, ``class_share/k``); the source needs labels;
    * ``per_time`` and ``predictors`` as for toys, from the default (neural) decomposition at ``ac.num_times`` times
      (``ac.fit_steps`` steps per network, the solenoidal part on ``ac.solenoidal_points`` of the points; L2 =
      gradient + solenoidal, without the true score), plus ``siem`` (``image_siem``: no reference) and
      ``bits_per_dim`` of ``ac.likelihood_samples`` data points (NaN when 0);
    * ``cost_s``: wall seconds of the sample-based quality, of the diagnostics, of the likelihood and of SIEM.
    """
    from gradscore.diagnostics import bits_per_dim

    from ..evaluation import draw_samples, likelihood_levels, quality

    d = math.prod(source.shape)
    if ac.num_data < 8 * d:
        raise ValueError(f"assessment.num_data = {ac.num_data} is too few for images of {d} dimensions: the "
                         f"neural decomposition's affine part needs at least 8 d = {8 * d} data points (its covariance "
                         "inverse is biased by O(d / N), most at small t)")
    if source.labels is None:
        raise ValueError(f"the image assessment needs a labelled data set (its classifier Frechet distance); "
                         f"{source.key()} has no labels")
    t0 = time.perf_counter()
    x = draw_samples(score_fn, sde, source.shape, ac.num_samples, ac.method, ac.sample_steps, ac.seed, "cpu")
    if samples_path:
        torch.save(x, samples_path)
    q = {k.removeprefix("quality/"): v for k, v in quality(source, x, eval_cfg, seed=ac.seed + 1).items()}
    t1 = time.perf_counter()
    g = torch.Generator().manual_seed(ac.seed + 2)
    x0 = source.sample_x0(ac.num_data, generator=g)
    times = default_times(sde, ac.num_times)
    kl = kl_bounds(score_fn, sde, x0, times, num_points=ac.num_points, generator=g,
                   options={"steps": ac.fit_steps, "solenoidal_points": ac.solenoidal_points})
    per_time, predictors = _per_time_and_predictors(kl, sde, times)
    t2 = time.perf_counter()
    predictors["bits_per_dim"] = float("nan")
    stderr = {"kl_girsanov": kl["girsanov"].stderr, "kl_gradient": kl["gradient"].stderr,
              "kl_prior": kl["prior"].stderr}
    if ac.likelihood_samples:
        xl = source.sample_x0(ac.likelihood_samples, generator=torch.Generator().manual_seed(ac.seed + 3))
        bpd = bits_per_dim(score_fn, sde, xl, levels=likelihood_levels(source),
                           generator=torch.Generator().manual_seed(ac.seed + 4), rtol=ac.likelihood_rtol,
                           atol=ac.likelihood_rtol)
        predictors["bits_per_dim"] = float(bpd.mean())
        stderr["bits_per_dim"] = float(bpd.std() / bpd.numel() ** 0.5)
    t3 = time.perf_counter()
    predictors["siem"], stderr["siem"], siem_seconds = image_siem(score_fn, sde, source.shape, ac)
    return {
        "quality": {k: _finite(float(v)) for k, v in q.items()},
        "per_time": per_time,
        "predictors": predictors,
        "kl_prior": kl["prior"].value,
        "stderr": stderr,
        "cost_s": {"quality": t1 - t0, "diagnostics": t2 - t1, "likelihood": t3 - t2, "siem": siem_seconds},
    }


def _cached(path: str, compute):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    write_json(path, result)
    return result


# Version of what ``assess`` returns, part of the cache key: cached assessments of another layout are
# recomputed, not read (2: the prior term's value under ``kl_prior``, its stderr under ``stderr``).
ASSESSMENT_FORMAT = 3


def _assessment_key(ac: AssessmentConfig) -> str:
    """Assessments are cached per assessment setting and format: changing a size re-assesses."""
    key = json.dumps({"format": ASSESSMENT_FORMAT, **asdict(ac)}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def _run_info(spec: RunSpec) -> dict:
    info = {"run_id": spec.run_id, "label": spec.label, "base_label": spec.base_label, "objective": spec.objective,
            "seed": spec.seed, "arm": spec.arm, "steps": spec.config.train.max_steps}
    if os.path.isfile(final_metrics_path(spec)):
        with open(final_metrics_path(spec)) as f:
            info["final_metrics"] = json.load(f)
    segs = segments(spec)
    info["wall_s"] = sum(s["wall_s"] for s in segs if s["status"] != "failed") if segs else None
    info["failed"] = next((s["error"] for s in reversed(segs) if s["status"] == "failed"), None) \
        if not os.path.isfile(final_metrics_path(spec)) else None
    return info


def _checkpoints(spec: RunSpec, st, key: str):
    """``(checkpoint, step, cache file, samples file)`` of every checkpoint of ``spec`` that is assessed: the final one,
    and the kept intermediate ones when the study wants them. Only the final checkpoint keeps its samples."""
    final_step = spec.config.train.max_steps
    for ck in checkpoint_dirs(spec.run_dir):
        step = read_step(ck)
        if step != final_step and not (st.enabled and st.intermediate_checkpoints):
            continue
        folder, name = os.path.join(spec.run_dir, "assessment"), os.path.basename(ck)
        yield ck, step, os.path.join(folder, f"{name}-{key}.json"), os.path.join(folder, f"samples-{name}-{key}.pt")


def _assess_model(config, ckpt: str, target, ac: AssessmentConfig, samples: str | None, toy: bool) -> dict:
    """The assessment of checkpoint ``ckpt`` against ``target`` (a toy mixture or the image source); its samples are
    saved at ``samples`` when given."""
    sde, model, _ = load_trained(config, ckpt)
    if samples:
        os.makedirs(os.path.dirname(samples), exist_ok=True)
    if toy:
        return assess(model, sde, target, ac, samples_path=samples)
    return assess_images(model, sde, target, ac, config.eval, samples_path=samples)


def _assess_checkpoint(config, ckpt: str, ac: AssessmentConfig, cache: str, samples: str | None, toy: bool,
                       threads: int) -> str:
    """One checkpoint's assessment into its cache file (a worker of ``_assess_in_parallel``); returns ``cache``."""
    torch.set_num_threads(threads)
    target = toy_mixture(config.data) if toy else build_source(config.data)
    _cached(cache, lambda: _assess_model(config, ckpt, target, ac, samples, toy))
    return cache


def _assess_in_parallel(jobs: list[tuple], width: int, progress: bool) -> None:
    """Fill the caches of ``jobs`` (the arguments of ``_assess_checkpoint``) with ``width`` spawned processes of one
    thread each: the models are small, so processes scale where a second thread in one process does not."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=width, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_assess_checkpoint, *job, 1): job for job in jobs}
        for i, fut in enumerate(as_completed(futures)):
            fut.result()                               # a failed assessment raises here, naming its checkpoint
            if progress:
                print(f"[ablate] assessed {i + 1}/{len(jobs)}: {futures[fut][1]}", flush=True)


def assess_all(ab: Ablation, progress: bool = True) -> dict:
    """Assess every finished run (final checkpoint, and the kept intermediate ones when the study wants
    them) and the perturbed exact scores. Returns ``{"runs": [...], "population": [...]}``."""
    ac, st = ab.schema.assessment, ab.schema.study
    key = _assessment_key(ac)
    runs, population = [], []
    t0 = time.perf_counter()
    toy = all(r.config.data.kind == "toy" for r in ab.runs())
    # images: every model assessed alike by assess_images when the quality is the classifier's (the comparison and
    # the study, issue 13); otherwise the comparison reads what the training loop measured
    images = not toy and st.quality == "classifier_fd"
    if images and any(r.config.model.num_classes for r in ab.runs()):
        raise ValueError("the image study assesses unconditional models; the ablation's base config has "
                         "model.num_classes > 0")
    sources = {}
    base_model = None                   # images: the first finished run's final model, for the perturbed models
    lc = ab.schema.launcher
    width = lc.parallel if lc.kind == "subprocess" else 1
    if width > 1 and (toy or images):   # every uncached checkpoint first, launcher.parallel at a time
        jobs = [(spec.config, ck, ac, cache, samples if step == spec.config.train.max_steps else None, toy)
                for spec in ab.runs() if os.path.isfile(final_metrics_path(spec))
                for ck, step, cache, samples in _checkpoints(spec, st, key) if not os.path.isfile(cache)]
        if len(jobs) > 1:
            if images:                  # the quality classifier, trained once here rather than by every worker
                from gradscore import quality as Q
                src = build_source(jobs[0][0].data)
                Q.feature_net(src.key(), src.images, src.labels, jobs[0][0].eval.classifier_cache)
            if progress:
                print(f"[ablate] assessing {len(jobs)} checkpoints, {width} processes", flush=True)
            _assess_in_parallel(jobs, width, progress)
    for spec in ab.runs():
        info = _run_info(spec)
        runs.append(info)
        if "final_metrics" not in info or not (toy or images):
            continue
        if toy:
            target = toy_mixture(spec.config.data)
        else:                                                           # images: the data source, built once
            key_data = repr(spec.config.data)
            if key_data not in sources:
                sources[key_data] = build_source(spec.config.data)
            target = sources[key_data]
        final_step = spec.config.train.max_steps
        for ck, step, cache, samples in _checkpoints(spec, st, key):
            keep = samples if step == final_step else None                 # samples of the final checkpoint only
            if progress:
                print(f"[ablate] assessing {spec.run_id} @ {step}", flush=True)
            result = _cached(cache, lambda spec=spec, ck=ck, target=target, keep=keep:
                             _assess_model(spec.config, ck, target, ac, keep, toy))
            if images:
                result = _with_siem(result, cache, lambda spec=spec, ck=ck: load_trained(spec.config, ck)[:2],
                                    target.shape, ac)
            result.update({"name": f"{spec.run_id} @ {step}", "family": "trained", "step": step,
                           "objective": spec.objective, "seed": spec.seed})
            if images and step == final_step and base_model is None:
                base_model = (spec, ck, target)
            if step == final_step:
                info["assessment"] = result
                info["samples_path"] = samples
            if st.enabled:
                population.append(result)
    members = []          # the perturbed models: (name, Perturbed, assess it)
    if st.enabled and toy and ab.runs():
        spec0 = ab.runs()[0]
        sde, mixture = build_sde(spec0.config), toy_mixture(spec0.config.data)
        members = [(p.name, p, lambda p: assess(p.score_fn, sde, mixture, ac))
                   for p in perturbed_scores(mixture.score_fn(sde), st.rotations, st.gradient_errors,
                                             st.combinations)]
    if st.enabled and images and base_model is not None:
        # perturbations of a trained model in pixel space: s + c J s (J skew; approximately zero-effect, exactly so
        # only for the exact score) and s + a A x (a gradient error), the same families as the toy study; the
        # unperturbed model is in the population already, as a trained checkpoint
        spec0, ck0, source = base_model
        sde, model, _ = load_trained(spec0.config, ck0)
        members = [(f"{spec0.run_id} + {p.name}", p, lambda p: assess_images(p.score_fn, sde, source, ac,
                                                                              spec0.config.eval))
                   for p in perturbed_scores(model, st.rotations, st.gradient_errors, st.combinations)[1:]]
    for name, p, assess_one in members:
        safe = p.name.replace(" ", "_").replace("=", "").replace("+", "and")
        if progress and images:
            print(f"[ablate] assessing {name}", flush=True)
        cache = os.path.join(ab.output_dir, "study", f"{safe}-{key}.json")
        result = _cached(cache, lambda f=assess_one, p=p: f(p))
        if images:
            result = _with_siem(result, cache, lambda p=p: (sde, p.score_fn), source.shape, ac)
        result.update({"name": name, "family": p.family, "a": p.a, "c": p.c})
        population.append(result)
    if progress:
        print(f"[ablate] assessed {len(population) or len(runs)} models in {time.perf_counter() - t0:.1f}s", flush=True)
    return {"runs": runs, "population": population}
