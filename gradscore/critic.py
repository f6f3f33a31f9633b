"""A scalar critic ``psi(x, t)`` whose input gradient estimates the gradient part of the score error
(docs/theory.md §5-6).

The critic is trained to maximise ``J(psi) = E[2 r . grad psi - |grad psi|^2]`` (``critic_objective``, per
sample) with the DSM residual ``r = s_theta(x_t, t) + eps / sigma_t``; at the optimum ``grad psi = Pi_G e_t``.
Because ``r`` is of order ``eps / sigma_t``, the potential is ``psi = psi~ / sigma_t`` with ``psi~`` the
backbone's output: a plain network (outputs of order one) then has the right scale at every ``t``, exactly
as ``EnergyScore`` does for the score.
"""
from __future__ import annotations

import torch
from torch import nn

from .double_backward import compact_silu as _convert_silu
from .double_backward import input_gradient, math_attention
from .parametrisation import call_backbone, scalar_per_sample
from .sde import SDE, time_tensor

__all__ = ["Critic", "critic_objective"]


def critic_objective(residual: torch.Tensor, grad_psi: torch.Tensor) -> torch.Tensor:
    """``2 r . g - |g|^2`` per sample, ``[B]``, for ``residual = r`` and ``grad_psi = g``, both ``[B, *D]``.

    Its mean is ``J(psi)``, maximised at ``g = Pi_G e`` where it equals ``||Pi_G e||^2`` (docs/theory.md §5).
    Homogeneous of degree 2: scaling ``r`` and ``g`` by ``sigma_t`` scales it by ``sigma_t^2``."""
    if residual.shape != grad_psi.shape:
        raise ValueError(f"critic_objective: residual {tuple(residual.shape)} and grad psi {tuple(grad_psi.shape)} "
                         "must have one shape [B, *D]")
    return (2 * residual * grad_psi - grad_psi**2).flatten(1).sum(1)


class Critic(nn.Module):
    """``grad_x psi(x, t)`` from a scalar backbone, computed inside ``forward``.

    Args:
        backbone: module ``(x, t) -> [B]`` (or ``[B, 1]``), one scalar per sample; any backbone
            accepted by ``call_backbone`` (``TimeMLP(d, out_dim=1)``, a diffusers model...).
        sde: the forward process (for ``sigma_t`` and diffusers timesteps).
        time_input: ``"auto"``, ``"t"`` or ``"timestep"`` (see ``call_backbone``).
        compact_silu: converts the backbone's ``nn.SiLU`` modules to ``CompactSiLU`` in place (same
            function, same state dict; its double backward saves less memory, docs/engineering.md
            "Double backward"); ``False`` leaves the backbone untouched.
    Shapes: ``forward(x: [B, *D], t: [B] or float) -> grad_x psi [B, *D]``;
    ``potential(x, t) -> psi [B]``.

    The gradient is taken inside ``forward`` (with ``create_graph`` whenever grad mode is on) so a
    DDP-wrapped critic sees one ordinary graph. Parameters that ``grad_x psi`` does not depend on
    (the last bias of a scalar head) get an exact zero gradient (``input_gradient``), so DDP
    with ``find_unused_parameters=False`` (accelerate's default) does not wait for them.
    """

    def __init__(self, backbone: nn.Module, sde: SDE, time_input: str = "auto", *, compact_silu: bool = True):
        super().__init__()
        if time_input not in ("auto", "t", "timestep"):
            raise ValueError(f"time_input must be 'auto', 't' or 'timestep', got {time_input!r}")
        if compact_silu:
            _convert_silu(backbone)
        self.backbone, self.sde, self.time_input = backbone, sde, time_input

    def potential(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``psi(x, t) = psi~(x, t) / sigma_t``, shape ``[B]``."""
        t = time_tensor(t, x, batch=x.shape[0])
        with math_attention():
            out = call_backbone(self.backbone, x, t, self.sde, self.time_input)
        out = scalar_per_sample(out, x.shape[0], "the critic backbone")
        return out.to(x.dtype) / self.sde.sigma(t).to(x.dtype)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        grad, _ = input_gradient(self.potential, x, t)
        return grad.to(x.dtype)
