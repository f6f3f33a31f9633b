"""A scalar critic ``psi(x, t)`` whose input gradient estimates the gradient part of the score error
(THEORY sections 5-6).

The critic is trained to maximise ``J(psi) = E[2 r . grad psi - |grad psi|^2]`` with the DSM residual
``r = s_theta(x_t, t) + eps / sigma_t``; at the optimum ``grad psi = Pi_G e_t``. Because ``r`` is of
order ``eps / sigma_t``, the potential is ``psi = psi~ / sigma_t`` with ``psi~`` the backbone's
output: a plain network (outputs of order one) then has the right scale at every ``t``, exactly as
``EnergyScore`` does for the score.
"""
from __future__ import annotations

import torch
from torch import nn

from .double_backward import compact_silu, input_gradient, math_attention
from .parametrisation import call_backbone, scalar_per_sample
from .sde import SDE, time_tensor

__all__ = ["Critic"]


class Critic(nn.Module):
    """``grad_x psi(x, t)`` from a scalar backbone, computed inside ``forward``.

    Args:
        backbone: module ``(x, t) -> [B]`` (or ``[B, 1]``), one scalar per sample; any backbone
            accepted by ``call_backbone`` (``TimeMLP(d, out_dim=1)``, a diffusers model...).
        sde: the forward process (for ``sigma_t`` and diffusers timesteps).
        time_input: ``"auto"``, ``"t"`` or ``"timestep"`` (see ``call_backbone``).
    Shapes: ``forward(x: [B, *D], t: [B] or float) -> grad_x psi [B, *D]``;
    ``potential(x, t) -> psi [B]``.

    The gradient is taken inside ``forward`` (with ``create_graph`` whenever grad mode is on) so a
    DDP-wrapped critic sees one ordinary graph. Parameters that ``grad_x psi`` does not depend on
    (the last bias of a scalar head) get an exact zero gradient (``input_gradient``), so DDP
    with ``find_unused_parameters=False`` (accelerate's default) does not wait for them.
    """

    def __init__(self, backbone: nn.Module, sde: SDE, time_input: str = "auto"):
        super().__init__()
        if time_input not in ("auto", "t", "timestep"):
            raise ValueError(f"time_input must be 'auto', 't' or 'timestep', got {time_input!r}")
        compact_silu(backbone)                  # SiLU's double backward without elementwise intermediates
        self.backbone, self.sde, self.time_input = backbone, sde, time_input

    def potential(self, x: torch.Tensor, t) -> torch.Tensor:
        """``psi(x, t) = psi~(x, t) / sigma_t``, shape ``[B]``."""
        t = time_tensor(t, x, batch=x.shape[0])
        with math_attention():
            out = call_backbone(self.backbone, x, t, self.sde, self.time_input)
        out = scalar_per_sample(out, x.shape[0], "the critic backbone")
        return out.to(x.dtype) / self.sde.sigma(t).to(x.dtype)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        grad, _ = input_gradient(self.potential, x, t)
        return grad.to(x.dtype)
