"""A scalar critic ``psi(x, t)`` whose input gradient estimates the gradient part of the score error
(docs/theory.md §5-6).

The critic is trained to maximise ``J(psi) = E[2 r . grad psi - |grad psi|^2]`` (``critic_objective``, per
sample) with the DSM residual ``r = s_theta(x_t, t) + eps / sigma_t``; at the optimum ``grad psi = Pi_G e_t``.
Because ``r`` is of order ``eps / sigma_t``, the potential is ``psi = psi~ / sigma_t`` with ``psi~`` the
backbone's output: a plain network (outputs of order one) then has the right scale at every ``t``, exactly
as ``EnergyScore`` does for the score. ``psi~`` is the backbone's scalar output, or ``<x, f(x, t)> / 2`` for a
backbone ``f`` whose output is shaped like ``x`` (``potential="inner"``: any image network, a diffusers
``UNet2DModel`` included, becomes an image critic). Conditioning keywords (``**cond``) go to the backbone unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .double_backward import (
    attention_chunk_bytes,
    input_gradient,
    math_attention,
    silu_mlp_input_gradient,
    time_mlp_layers,
)
from .double_backward import compact_silu as _convert_silu
from .parametrisation import call_backbone, resolve_time_input, scalar_per_sample
from .sde import SDE, time_tensor

__all__ = ["Critic", "critic_objective", "POTENTIALS"]

POTENTIALS = ("auto", "scalar", "inner")


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
        backbone: module ``(x, time, **cond)`` returning one scalar per sample (``[B]`` or ``[B, 1]``:
            ``TimeMLP(d, out_dim=1)``, a conv net with a scalar head) or a tensor shaped like ``x`` (a
            ``UNet2DModel``); any backbone accepted by ``call_backbone``.
        sde: the forward process (for ``sigma_t`` and diffusers timesteps).
        time_input: ``"auto"``, ``"t"`` or ``"timestep"`` (see ``parametrisation.resolve_time_input``).
        potential: ``"scalar"`` (the default: ``psi~ = f``, one number per sample; any other output raises),
            ``"inner"`` (``psi~ = <x, f> / 2`` with ``f`` shaped like ``x``: the image critic
            ``Critic(UNet2DModel(...), sde, potential="inner")``) or ``"auto"`` (decided by the output's shape).
        compact_silu: converts the backbone's ``nn.SiLU`` modules to ``CompactSiLU`` in place (same
            function, same state dict; its double backward saves less memory, docs/engineering.md
            "Double backward"); ``False`` leaves the backbone untouched.
    Shapes: ``forward(x: [B, *D], t: [B] or float, **cond) -> grad_x psi [B, *D]``;
    ``potential(x, t, **cond) -> psi [B]``.

    The gradient is taken inside ``forward`` (with ``create_graph`` whenever grad mode is on) so a
    DDP-wrapped critic sees one ordinary graph. Parameters that ``grad_x psi`` does not depend on
    (the last bias of a scalar head) get an exact zero gradient (``input_gradient``), so DDP
    with ``find_unused_parameters=False`` (accelerate's default) does not wait for them. A scalar ``TimeMLP``
    critic takes its gradient as one fused node in training (``fused_input_gradient = False``: the general route).
    """

    def __init__(self, backbone: nn.Module, sde: SDE, time_input: str = "auto", *, potential: str = "scalar",
                 compact_silu: bool = True):
        super().__init__()
        if potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
        time_input = resolve_time_input(backbone, time_input)
        if compact_silu:
            _convert_silu(backbone)
        self.backbone, self.sde, self.time_input, self.potential_kind = backbone, sde, time_input, potential
        self.attention_chunk_bytes = attention_chunk_bytes(backbone)      # as for EnergyScore
        self.attention_written_derivative = True
        self.fused_input_gradient = True      # a scalar TimeMLP: one fused node (False: input_gradient)

    def potential(self, x: torch.Tensor, t: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """``psi(x, t) = psi~(x, t) / sigma_t``, shape ``[B]``."""
        t = time_tensor(t, x, batch=x.shape[0])
        with math_attention(self.attention_chunk_bytes, self.attention_written_derivative):
            out = call_backbone(self.backbone, x, t, self.sde, self.time_input, **cond)
        kind = self.potential_kind
        if kind == "auto":
            kind = "inner" if out.shape == x.shape else "scalar"
        if kind == "inner":
            if out.shape != x.shape:
                raise ValueError(f"potential='inner' needs a critic backbone output shaped like x {tuple(x.shape)}, "
                                 f"got {tuple(out.shape)}")
            out = 0.5 * (x * out.to(x.dtype)).flatten(1).sum(1)
        else:
            out = scalar_per_sample(out, x.shape[0], "the critic backbone (potential='scalar'; for a backbone shaped "
                                    "like x, such as a UNet2DModel, use potential='inner')")
        return out.to(x.dtype) / self.sde.sigma(t).to(x.dtype)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        layers = None if cond else self._silu_mlp_layers(x)
        if layers is not None:
            return self._silu_mlp_gradient(x, t, *layers)
        grad, _ = input_gradient(lambda x_, t_: self.potential(x_, t_, **cond), x, t)
        return grad.to(x.dtype)

    # The scalar TimeMLP critic (the toy's): grad_x psi as one fused autograd node
    # (double_backward.silu_mlp_input_gradient), the same function and gradients as input_gradient
    # with ~1/3 of its operators (tests/test_fast_paths.py; BENCHMARKS.md, "What limits the critic
    # objectives on the toy MLP"). Anything else, or anything that could observe the difference
    # (hooks, autocast, an x that requires grad), takes the general path.
    def _silu_mlp_layers(self, x: torch.Tensor):
        if self.potential_kind == "inner" or not self.fused_input_gradient:
            return None
        return time_mlp_layers(self.backbone, x, self.time_input, 1)

    def _silu_mlp_gradient(self, x, t, linears, head):
        bb = self.backbone
        grad = silu_mlp_input_gradient(bb.net_input(x, t), bb.dim, linears, head)
        return (grad / self.sde.sigma(t).to(x.dtype)[:, None]).reshape(x.shape)
