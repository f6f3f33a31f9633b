"""The path-integral potential of a vector field (docs/theory.md §6, "path potential").

For a field ``s`` and a centre ``c`` let ``U_s(x) = int_0^1 s(c + tau (x - c)) . (x - c) dtau``. If ``s`` is a
gradient field, ``s = grad E``, then ``U_s(x) = E(x) - E(c)`` and ``grad U_s = s`` exactly (the fundamental
theorem of calculus on the segment from ``c`` to ``x``). For any other field ``grad U_s`` is still a gradient
field. Using it as one direction of the regression onto gradient fields makes the solenoidal estimate vanish,
up to quadrature error, for every conservative model (``EnergyScore`` whatever its weights, any ``-grad E``),
whatever the dimension, without a network having to learn the model.

The integral is a Gauss-Legendre rule with ``nodes`` points; ``grad U_s`` costs ``nodes`` evaluations of ``s``
and as many vector-Jacobian products.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["path_potential_gradient", "gauss_legendre"]


def gauss_legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the ``nodes``-point Gauss-Legendre rule on ``[0, 1]``."""
    tau, w = np.polynomial.legendre.leggauss(nodes)
    return (tau + 1) / 2, w / 2


def path_potential_gradient(score_fn, x: torch.Tensor, t: torch.Tensor, center: torch.Tensor, nodes: int = 8,
                            **cond) -> torch.Tensor:
    """``grad_x U_s(x)`` for ``x: [B, *D]``, ``t: [B]``, ``center: [*D]``; ``cond`` per-sample tensors for
    ``score_fn(x, t, **cond)``. Returns ``[B, *D]`` (detached, ``x``'s dtype).

    Raises ``TypeError`` if ``score_fn`` is not differentiable in ``x`` (then pass ``path_nodes=0``)."""
    taus, ws = gauss_legendre(nodes)
    xg = x.detach().requires_grad_(True)
    out = torch.zeros_like(x)
    c = center.to(x.dtype).expand_as(x)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        for tau, w in zip(taus, ws):
            y = c + float(tau) * (xg - c)
            s = score_fn(y, t, **cond)
            if not s.requires_grad:
                raise TypeError("path_potential_gradient: score_fn(x, t) is not differentiable in x (its output does "
                                "not require grad); pass path_nodes=0 to the diagnostics to skip the path potential")
            u = float(w) * (s.to(x.dtype) * (xg - c)).flatten(1).sum(1)
            (g,) = torch.autograd.grad(u.sum(), xg)
            out += g.detach()
    return out
