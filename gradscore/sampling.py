"""Samplers driven by any score callable (THEORY sections 3-4).

Reverse SDE (Euler-Maruyama): ``dx = [f - g^2 s] dt + g dW_bar`` from ``t = 1`` to ``t_min``;
probability-flow ODE (Heun, second order): ``dx/dt = f - g^2 s / 2``. Heun keeps rotations
(zero-effect perturbations) from inflating the radius the way an explicit Euler step does.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .sde import SDE, broadcast_to

__all__ = ["sample"]


@torch.no_grad()
def sample(score_fn, sde: SDE, shape, method: str = "sde", steps: int = 500, generator: torch.Generator | None = None,
           device=None, dtype=torch.float32, x_T: torch.Tensor | None = None, t_min: float | None = None,
           progress: bool = False, return_trajectory: bool = False):
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
    Returns:
        ``x [B, *D]`` at ``t_min`` (and the trajectory if asked).
    """
    if method not in ("sde", "ode"):
        raise ValueError(f"method must be 'sde' or 'ode', got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_end = sde.t_min if t_min is None else float(t_min)
    x = sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T.clone()
    ts = torch.linspace(sde.T, t_end, steps + 1, dtype=torch.float64)
    B = x.shape[0]
    traj = [x.cpu()] if return_trajectory else None

    def vec(t):
        return torch.full((B,), float(t), dtype=x.dtype, device=x.device)

    def ode_drift(x, t):
        tt = vec(t)
        return sde.drift(x, tt) - 0.5 * broadcast_to(sde.g2(tt), x) * score_fn(x, tt)

    for i in tqdm(range(steps), disable=not progress, desc=f"sampling ({method})", leave=False):
        t, t_next = float(ts[i]), float(ts[i + 1])
        h = t_next - t                                                     # negative
        if method == "ode":
            d1 = ode_drift(x, t)
            x_pred = x + h * d1
            d2 = ode_drift(x_pred, t_next)
            x = x + 0.5 * h * (d1 + d2)
        else:
            tt = vec(t)
            g2 = broadcast_to(sde.g2(tt), x)
            x = x + h * (sde.drift(x, tt) - g2 * score_fn(x, tt))
            if i < steps - 1:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + (g2 * (-h)).sqrt() * z
        if traj is not None:
            traj.append(x.cpu())
    return (x, traj) if return_trajectory else x
