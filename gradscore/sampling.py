"""Samplers driven by any score callable (docs/theory.md §3-4).

Reverse SDE (Euler-Maruyama): ``dx = [f - g^2 s] dt + g dW_bar`` from ``t = 1`` to ``t_min``;
probability-flow ODE (Heun, second order): ``dx/dt = f - g^2 s / 2``. Heun keeps rotations
(zero-effect perturbations) from inflating the radius the way an explicit Euler step does.
``reverse_sde_step`` is the one Euler-Maruyama step of the reverse SDE, public so that other samplers
(the diagnostics' SIEM) take the same step as ``sample``.

Conditioning keywords (``class_labels=y``: per-sample tensors aligned with the batch) reach the score as
``score_fn(x, t, **cond)``. Classifier-free guidance (``guidance_scale=w``, a user-given ``null_cond``)
samples with ``s_w = (1 + w) s(x, t | c) - w s(x, t | null)`` (``guided_score``, docs/theory.md §9.5); a
combination of two conservative scores is conservative.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .parametrisation import check_cond
from .schedulers import clip_x0_score, sample_with_scheduler
from .sde import SDE, broadcast_to, time_tensor

__all__ = ["sample", "reverse_sde_step", "guided_score", "conditioned"]

ScoreFn = Callable[..., torch.Tensor]


def conditioned(score_fn: ScoreFn, **cond: Any) -> ScoreFn:
    """``(x, t) -> score_fn(x, t, **cond)``: a conditional score with its condition fixed (``score_fn`` itself
    when ``cond`` is empty)."""
    if not cond:
        return score_fn
    return lambda x, t: score_fn(x, t, **cond)


def guided_score(score_fn: ScoreFn, guidance_scale: float, cond: dict[str, Any], null_cond: dict[str, Any]
                 ) -> ScoreFn:
    """Classifier-free guidance: ``(x, t) -> (1 + w) s(x, t | cond) - w s(x, t | null_cond)``, ``w = guidance_scale``.

    ``null_cond`` holds the same keys as ``cond`` with the null condition (e.g. the extra label a model was
    trained with when its label was dropped). The two conditions are evaluated separately (never batched
    together), and at ``w = 0`` only the condition is, so ``w = 0`` gives the conditional score exactly.
    """
    if set(null_cond) != set(cond):
        raise ValueError(f"null_cond must hold the same keys as the condition: got {sorted(null_cond)}, "
                         f"condition {sorted(cond)}")
    w = float(guidance_scale)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional = score_fn(x, t, **cond)
        if w == 0:
            return conditional
        return (1 + w) * conditional - w * score_fn(x, t, **null_cond)

    return guided


def reverse_sde_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float | torch.Tensor, h: float,
                     noise: torch.Tensor | None) -> torch.Tensor:
    """One Euler-Maruyama step of the reverse SDE from time ``t`` to ``t + h`` (``h < 0``: backwards in time).

    ``x + h (f(x, t) - g(t)^2 s(x, t)) + sqrt(-h g(t)^2) noise``.

    Args:
        score_fn: ``(x [B, *D], t [B]) -> [B, *D]``.
        x: the state at ``t``, ``[B, *D]``.
        t: the current time, a float or ``[B]``.
        h: the (negative) time step.
        noise: standard normal ``[B, *D]``, or ``None`` for a step without noise (the last step of ``sample``).
    """
    if h >= 0:
        raise ValueError(f"h must be negative (the reverse SDE runs from t = 1 down to t_min), got {h}")
    tt = time_tensor(t, x, batch=x.shape[0])
    g2 = broadcast_to(sde.g2(tt), x)
    x = x + h * (sde.drift(x, tt) - g2 * score_fn(x, tt))
    if noise is None:
        return x
    if noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x's shape {tuple(x.shape)}")
    return x + (g2 * (-h)).sqrt() * noise


def _heun_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Heun step of the probability-flow ODE ``dx/dt = f - g^2 s / 2`` from ``t`` to ``t_next``."""
    def velocity(x, t):
        tt = time_tensor(t, x, batch=x.shape[0])
        return sde.drift(x, tt) - 0.5 * broadcast_to(sde.g2(tt), x) * score_fn(x, tt)

    h = t_next - t
    d1 = velocity(x, t)
    d2 = velocity(x + h * d1, t_next)
    return x + 0.5 * h * (d1 + d2)


@torch.no_grad()
def sample(score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], method: str = "sde", steps: int = 500,
           generator: torch.Generator | None = None, device: torch.device | str | None = None,
           dtype: torch.dtype = torch.float32, x_T: torch.Tensor | None = None, t_min: float | None = None,
           progress: bool = False, return_trajectory: bool = False, guidance_scale: float = 0.0,
           null_cond: dict[str, Any] | None = None, scheduler: Any = None, clip_x0: tuple[float, float] | None = None,
           **cond: Any) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw samples by integrating the reverse-time dynamics from the prior.

    Args:
        score_fn: ``(x: [B, *D], t: [B], **cond) -> [B, *D]`` (a model or a plain function).
        sde: the forward process (its prior starts the chain).
        shape: ``(B, *D)``.
        method: ``"sde"`` (Euler-Maruyama reverse SDE; last step noise-free) or ``"ode"`` (Heun
            probability flow).
        steps: number of time steps on a uniform grid from 1 to ``t_min`` (default ``sde.t_min``).
        x_T: optional starting point (else drawn from the prior with ``generator``).
        progress: show a progress bar.
        return_trajectory: also return the list of states (``steps + 1`` tensors, on CPU).
        guidance_scale: ``w`` of classifier-free guidance (``guided_score``); 0 (default) samples the
            conditional score itself.
        null_cond: the null condition for guidance, a dict with the keys of ``cond`` (needed when ``w != 0``).
        **cond: conditioning keywords passed to ``score_fn`` (per-sample tensors ``[B, ...]``).
        scheduler: a diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, EulerDiscrete, ...): its own loop with
            ``steps`` inference steps replaces ``method`` (``gradscore.schedulers.sample_with_scheduler``; ``sde``
            must match its schedule, e.g. ``DiscreteVPSDE.from_scheduler(scheduler)``).
        clip_x0: ``(low, high)``: clamp the score's x0 prediction to this range at every step, e.g. ``(-1, 1)`` for
            images (``gradscore.schedulers.clip_x0_score``).
    Returns:
        ``x [B, *D]`` at ``t_min`` (and the trajectory if asked).
    """
    check_cond(cond, shape[0], "sample")
    if guidance_scale != 0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs null_cond, the null condition (a dict with the "
                         f"keys {sorted(cond)}), e.g. null_cond={{'class_labels': torch.full_like(y, null_label)}}")
    if null_cond is not None:
        check_cond(null_cond, shape[0], "sample (null_cond)")
        score_fn = guided_score(score_fn, guidance_scale, cond, null_cond)
    else:
        score_fn = conditioned(score_fn, **cond)
    if clip_x0 is not None:
        score_fn = clip_x0_score(score_fn, sde, clip_x0)
    if scheduler is not None:
        return sample_with_scheduler(score_fn, sde, shape, scheduler, steps=steps, generator=generator, device=device,
                                     dtype=dtype, x_T=x_T, t_min=t_min, progress=progress,
                                     return_trajectory=return_trajectory)
    if method not in ("sde", "ode"):
        raise ValueError(f"method must be 'sde' or 'ode', got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_end = sde.t_min if t_min is None else float(t_min)
    x = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T.clone()
    ts = torch.linspace(sde.T, t_end, steps + 1, dtype=torch.float64)
    traj = [x.cpu()] if return_trajectory else None
    for i in tqdm(range(steps), disable=not progress, desc=f"sampling ({method})", leave=False):
        t, t_next = float(ts[i]), float(ts[i + 1])
        if method == "ode":
            x = _heun_step(score_fn, sde, x, t, t_next)
        else:
            last = i == steps - 1
            noise = None if last else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = reverse_sde_step(score_fn, sde, x, t, t_next - t, noise)
        if traj is not None:
            traj.append(x.cpu())
    return (x, traj) if return_trajectory else x
