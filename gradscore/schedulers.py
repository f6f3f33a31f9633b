"""Sampling with diffusers schedulers driven by a gradscore score, and x0 clipping (docs/theory.md §1 and §4).

At a step whose network input is the VP state ``x = alpha_t x0 + sigma_t eps``, a score ``s(x, t)`` gives every
prediction a scheduler asks for: ``eps = -sigma_t s``, ``x0 = (x + sigma_t^2 s) / alpha_t`` (Tweedie) and
``v = alpha_t eps - sigma_t x0``. DDPM, DDIM and DPMSolverMultistep carry the VP state at integer timesteps ``k``
(``t = k / (N - 1)``, ``alpha_t^2 = alphas_cumprod[k]``). EulerDiscrete carries ``x / alpha_t`` and
``sigma_E = sigma_t / alpha_t``; its ``scale_model_input`` divides by ``sqrt(1 + sigma_E^2) = 1 / alpha_t``, which is
the VP state again, but its timesteps are fractional and its ``sigma_E`` is interpolated linearly between integer
steps, so the time handed to the score is the one at which the process has ``alpha_t^2 = 1 / (1 + sigma_E^2)``
(found by bisection), not ``k / (N - 1)``. Every scheduler's own ``sigmas`` are read the same way.

x0 clipping replaces the Tweedie ``x0`` by ``clamp(x0, lo, hi)`` and returns the score of that prediction,
``s' = (alpha_t x0' - x) / sigma_t^2``: what DDIM's ``clip_sample`` does to its eps, for any sampler.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .sde import SDE, broadcast_to, time_tensor

__all__ = ["sample_with_scheduler", "check_schedule", "score_to_prediction", "clip_x0_score", "time_of_alpha2",
           "step_schedule", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
ScoreFn = Callable[..., torch.Tensor]


def check_schedule(sde: SDE, scheduler: Any, rtol: float = 1e-5) -> None:
    """Raise ``ValueError`` unless ``sde`` has ``alpha_t^2 = alphas_cumprod[k]`` at ``t = k / (N - 1)`` for every
    step ``k`` of ``scheduler`` (relative tolerance ``rtol``): the process the score was trained under must be the
    scheduler's, e.g. ``DiscreteVPSDE.from_scheduler(scheduler)``."""
    name = type(scheduler).__name__
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"{name} has no alphas_cumprod: sample(..., scheduler=) needs a DDPM-type diffusers scheduler")
    ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).flatten()
    n = ac.numel()
    if getattr(sde, "num_steps", n) != n:
        raise ValueError(f"the process has {sde.num_steps} steps but {name} has num_train_timesteps={n}; "
                         f"use DiscreteVPSDE.from_scheduler(scheduler)")
    t = torch.arange(n, dtype=torch.float64) / (n - 1)
    a2 = sde.alpha(t).to(torch.float64) ** 2
    rel = ((a2 - ac).abs() / ac).max()
    if not rel <= rtol:
        k = int(((a2 - ac).abs() / ac).argmax())
        raise ValueError(f"{type(sde).__name__} does not match {name}'s schedule: alpha_t^2 = {float(a2[k]):.6g} at "
                         f"t = {k}/{n - 1} but alphas_cumprod[{k}] = {float(ac[k]):.6g} (largest relative difference "
                         f"{float(rel):.3g} > {rtol:g}); use DiscreteVPSDE.from_scheduler(scheduler)")


def time_of_alpha2(sde: SDE, alpha2: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """The times ``t in [0, 1]`` at which ``sde.alpha(t)^2 = alpha2`` (``[S]``), by bisection in float64
    (``alpha_t`` decreases in ``t``); values outside ``[alpha_1^2, alpha_0^2]`` end at the nearer end."""
    a2 = torch.as_tensor(alpha2, dtype=torch.float64)
    lo, hi = torch.zeros_like(a2), torch.ones_like(a2)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = sde.alpha(mid).to(torch.float64) ** 2 > a2     # alpha^2(mid) too large: the time lies later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def step_schedule(scheduler: Any, sde: SDE) -> list[tuple[float, float, float]]:
    """``(t, alpha_t, sigma_t)`` of the network input at each of ``scheduler.timesteps`` (after ``set_timesteps``).

    Schedulers with ``sigmas`` (EulerDiscrete, DPMSolverMultistep: ``sigma_E = sigma_t / alpha_t`` per step) define
    ``alpha_t = (1 + sigma_E^2)^{-1/2}``, placed in time by ``time_of_alpha2``; the others (DDPM, DDIM) use
    ``alphas_cumprod[k]`` at ``t = k / (N - 1)``."""
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float64).cpu()
    sigmas = getattr(scheduler, "sigmas", None)
    n = torch.as_tensor(scheduler.alphas_cumprod).numel()
    if sigmas is not None:
        sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if sig.numel() != timesteps.numel() + 1:
            raise ValueError(f"{type(scheduler).__name__} has {sig.numel()} sigmas for {timesteps.numel()} timesteps; "
                             "expected one more sigma than timesteps")
        alpha2 = 1.0 / (1.0 + sig[:-1] ** 2)
        t = time_of_alpha2(sde, alpha2)
        alpha, sigma = alpha2.sqrt(), (1 - alpha2).sqrt()
    else:
        ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).cpu()
        k = timesteps.round().long()
        if not torch.equal(k.double(), timesteps):
            raise ValueError(f"{type(scheduler).__name__} has fractional timesteps but no sigmas: cannot place them")
        t, alpha, sigma = k.double() / (n - 1), ac[k].sqrt(), (1 - ac[k]).sqrt()
    return [(float(a), float(b), float(c)) for a, b, c in zip(t, alpha, sigma)]


def score_to_prediction(score: torch.Tensor, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    """A scheduler's model output from the score at the VP state ``x = alpha x0 + sigma eps`` (both ``[B, *D]``):
    ``"epsilon"``: ``-sigma s``; ``"sample"``: ``(x + sigma^2 s) / alpha``; ``"v_prediction"``:
    ``alpha eps - sigma x0``."""
    eps = -sigma * score
    if prediction_type == "epsilon":
        return eps
    x0 = (x + sigma**2 * score) / alpha
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def clip_x0_score(score_fn: ScoreFn, sde: SDE, clip_x0: tuple[float, float]) -> ScoreFn:
    """The score whose Tweedie prediction is clamped to ``clip_x0 = (lo, hi)``:
    ``x0' = clamp((x + sigma_t^2 s) / alpha_t, lo, hi)``, ``s' = (alpha_t x0' - x) / sigma_t^2``.
    Shapes: ``(x [B, *D], t [B], **cond) -> [B, *D]``."""
    lo, hi = (float(v) for v in clip_x0)
    if not lo < hi:
        raise ValueError(f"clip_x0 must be (low, high) with low < high, got {clip_x0!r}")

    def clipped(x: torch.Tensor, t: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        s = score_fn(x, t, **cond)
        tt = time_tensor(t, x, batch=x.shape[0])
        alpha, sigma = broadcast_to(sde.alpha(tt).to(x.dtype), x), broadcast_to(sde.sigma(tt).to(x.dtype), x)
        x0 = ((x + sigma**2 * s) / alpha).clamp(lo, hi)
        return (alpha * x0 - x) / sigma**2

    return clipped


@torch.no_grad()
def sample_with_scheduler(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], scheduler: Any, steps: int = 50,
                          generator: torch.Generator | None = None, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32, x_T: torch.Tensor | None = None,
                          t_min: float | None = None, progress: bool = False, return_trajectory: bool = False,
                          **cond: Any) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Samples ``[B, *D]`` by a diffusers scheduler's loop, its model output computed from ``score_fn``.

    The loop is the one of diffusers' pipelines (``DDPMPipeline``): ``x_T = randn(shape, generator) *
    init_noise_sigma``, then at each timestep ``scale_model_input``, the prediction of the scheduler's
    ``prediction_type`` (``score_to_prediction``) and ``step(..., generator=generator)``, so a pipeline whose
    network predicts the same thing draws the same samples from the same generator. The scheduler passed is not
    modified (a copy from its config steps). ``sde`` must match its schedule (``check_schedule``).

    Args:
        score_fn: ``(x [B, *D], t [B], **cond) -> [B, *D]``.
        steps: ``num_inference_steps``.
        x_T: optional start in the scheduler's space (else drawn as above).
        cond: passed to ``score_fn`` at every call.
    Returns:
        ``x [B, *D]`` (and the list of states on CPU if ``return_trajectory``).
    """
    from diffusers.utils.torch_utils import randn_tensor

    if t_min is not None:
        raise ValueError("t_min does not apply with a scheduler: its timesteps end the chain")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_schedule(sde, scheduler)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{type(scheduler).__name__} has prediction_type={prediction_type!r}; "
                         f"supported: {PREDICTION_TYPES}")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps, device=device)
    schedule = step_schedule(sched, sde)
    if x_T is None:
        x = randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
        x = x * sched.init_noise_sigma
    else:
        x = x_T.clone()
    traj = [x.cpu()] if return_trajectory else None
    for timestep, (t, alpha, sigma) in tqdm(list(zip(sched.timesteps, schedule)), disable=not progress,
                                            desc=f"sampling ({type(scheduler).__name__})", leave=False):
        x_in = sched.scale_model_input(x, timestep)
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        out = score_to_prediction(score_fn(x_in, tt, **cond), x_in, alpha, sigma, prediction_type)
        x = sched.step(out.to(x.dtype), timestep, x, generator=generator).prev_sample
        if traj is not None:
            traj.append(x.cpu())
    return (x, traj) if return_trajectory else x
