"""Samplers driven by any score callable (docs/theory.md §3-4).

Reverse SDE (Euler-Maruyama): ``dx = [f - g^2 s] dt + g dW_bar`` from ``t = 1`` to ``t_min``;
probability-flow ODE (Heun, second order): ``dx/dt = f - g^2 s / 2``. Heun keeps rotations
(zero-effect perturbations) from inflating the radius the way an explicit Euler step does.
``reverse_sde_step`` is the one Euler-Maruyama step of the reverse SDE, public so that other samplers
(the diagnostics' SIEM) take the same step as ``sample``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .schedulers import clip_x0_score, sample_with_scheduler
from .sde import SDE, broadcast_to, time_tensor

__all__ = ["sample", "reverse_sde_step"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
           progress: bool = False, return_trajectory: bool = False, scheduler: Any = None,
           clip_x0: tuple[float, float] | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw samples by integrating the reverse-time dynamics from the prior.

    Args:
        score_fn: ``(x: [B, *D], t: [B]) -> [B, *D]`` (a model or a plain function).
        sde: the forward process (its prior starts the chain).
        shape: ``(B, *D)``.
        method: ``"sde"`` (Euler-Maruyama reverse SDE; last step noise-free) or ``"ode"`` (Heun
            probability flow).
        steps: number of time steps on a uniform grid from 1 to ``t_min`` (default ``sde.t_min``).
        x_T: optional starting point (else drawn from the prior with ``generator``).
        progress: show a progress bar.
        return_trajectory: also return the list of states (``steps + 1`` tensors, on CPU).
        scheduler: a diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, EulerDiscrete, ...): its own loop with
            ``steps`` inference steps replaces ``method`` (``gradscore.schedulers.sample_with_scheduler``; ``sde``
            must match its schedule, e.g. ``DiscreteVPSDE.from_scheduler(scheduler)``).
        clip_x0: ``(low, high)``: clamp the score's x0 prediction to this range at every step, e.g. ``(-1, 1)`` for
            images (``gradscore.schedulers.clip_x0_score``).
    Returns:
        ``x [B, *D]`` at ``t_min`` (and the trajectory if asked).
    """
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
