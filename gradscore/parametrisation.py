"""Turning any backbone into a score callable ``(x, t) -> score`` (docs/theory.md §1 and §7).

A *backbone* maps ``(x, time)`` to a tensor shaped like ``x`` or to one scalar per sample. It may
be a plain module called as ``backbone(x, t)`` with continuous ``t: [B]``, or a diffusers model
(``UNet2DModel``...) called as ``backbone(x, timestep).sample``: ``time_input="auto"`` chooses.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .double_backward import compact_silu as _convert_silu
from .double_backward import input_gradient, math_attention
from .sde import SDE, broadcast_to, time_tensor

__all__ = ["ScoreModel", "EnergyScore", "call_backbone", "ENERGIES"]


def _is_diffusers(module: object) -> bool:
    return any(c.__module__.startswith("diffusers") for c in type(module).__mro__)


def call_backbone(backbone: Callable, x: torch.Tensor, t: float | torch.Tensor, sde: SDE,
                  time_input: str = "auto") -> torch.Tensor:
    """Evaluate ``backbone`` at ``(x, t)`` with ``t: [B]`` continuous time.

    ``time_input``: ``"t"`` passes ``t``; ``"timestep"`` passes ``sde.timestep(t)`` (diffusers
    convention); ``"auto"`` uses ``"timestep"`` for diffusers models, else ``"t"``. Outputs with a
    ``.sample`` field or tuples are unwrapped.
    """
    t = time_tensor(t, x, batch=x.shape[0])
    mode = time_input
    if mode == "auto":
        mode = "timestep" if _is_diffusers(backbone) else "t"
    if mode == "timestep":
        tt = sde.timestep(t)
    elif mode == "t":
        tt = t
    else:
        raise ValueError(f"time_input must be 'auto', 't' or 'timestep', got {time_input!r}")
    out = backbone(x, tt)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


class ScoreModel(nn.Module):
    """Score from a backbone predicting noise, score or clean data.

    ``output="eps"``: ``score = -eps_hat / sigma_t``; ``"score"``: the output is the score;
    ``"x0"``: ``score = (alpha_t x0_hat - x) / sigma_t^2``.

    Args:
        backbone: module ``(x, t) -> [B, *D]`` (see ``call_backbone``).
        sde: the forward process.
    Shapes: ``forward(x: [B, *D], t: [B] or float) -> [B, *D]``.
    """

    OUTPUTS = ("eps", "score", "x0")

    def __init__(self, backbone: nn.Module, sde: SDE, output: str = "eps", time_input: str = "auto"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        self.backbone, self.sde, self.output, self.time_input = backbone, sde, output, time_input

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        out = call_backbone(self.backbone, x, t, self.sde, self.time_input)
        if out.shape != x.shape:
            raise ValueError(f"backbone output has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
        out = out.to(x.dtype)
        if self.output == "score":
            return out
        sigma = broadcast_to(self.sde.sigma(t).to(x.dtype), x)      # x's dtype even when t is wider
        if self.output == "eps":
            return -out / sigma
        alpha = broadcast_to(self.sde.alpha(t).to(x.dtype), x)
        return (alpha * out - x) / sigma**2


# Energies E~(x, t) from a backbone output f; the energy is E = E~ / sigma_t so that
# eps_hat = grad_x E~ and score = -grad_x E~ / sigma_t (the eps scale, as for ScoreModel).
def scalar_per_sample(out: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``out`` as ``[B]`` (a ``[B, 1]`` output is squeezed); anything else raises an error naming ``what``."""
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (batch,):
        raise ValueError(f"{what} must return one scalar per sample, shape [{batch}] or [{batch}, 1], "
                         f"got {tuple(out.shape)} (for TimeMLP use out_dim=1)")
    return out


def _energy_scalar(f, x, sigma):
    return scalar_per_sample(f, x.shape[0], "the backbone of energy='scalar'")


def _check_like_x(f, x, name):
    if f.shape != x.shape:
        raise ValueError(f"energy={name!r} needs a backbone output shaped like x {tuple(x.shape)}, "
                         f"got {tuple(f.shape)}")


def _energy_norm(f, x, sigma):
    _check_like_x(f, x, "norm")
    return 0.5 * f.flatten(1).pow(2).sum(1)


def _energy_inner(f, x, sigma):
    _check_like_x(f, x, "inner")
    return 0.5 * (x * f).flatten(1).sum(1)


def _energy_residual(f, x, sigma):
    _check_like_x(f, x, "residual")
    return 0.5 * (x - f).flatten(1).pow(2).sum(1) / sigma


ENERGIES = {
    "scalar": _energy_scalar,      # E~ = f(x, t)                         (backbone returns [B])
    "norm": _energy_norm,          # E~ = |f(x, t)|^2 / 2
    "inner": _energy_inner,        # E~ = <x, f(x, t)> / 2                 (exact for symmetric linear f)
    "residual": _energy_residual,  # E~ = |x - f(x, t)|^2 / (2 sigma_t)    (f predicts alpha_t x0)
}


class EnergyScore(nn.Module):
    """Conservative score ``s = -grad_x E_theta(x, t)`` around any backbone (docs/theory.md §7).

    The energy is ``E = E~(f(x, t), x) / sigma_t`` with ``E~`` one of ``ENERGIES`` (a name or a
    callable ``(f, x, sigma_t: [B]) -> [B]``). The gradient is taken inside ``forward`` with
    ``create_graph`` whenever grad mode is on (training), on a copy of ``x`` (never mutated);
    attention runs on the math kernel so diffusers UNets with attention blocks double-backward.
    In training every parameter that enters ``E`` gets a gradient (an exact zero for one that only
    shifts ``E`` by a constant in ``x``), so DDP works without ``find_unused_parameters``.
    With ``compact_silu=True`` (the default) the backbone's ``nn.SiLU`` modules are converted to
    ``CompactSiLU`` in place (``double_backward.compact_silu``: same function, same state dict; the
    double backward saves less memory, see BENCHMARKS.md, "Fast paths tried"); ``compact_silu=False``
    leaves the backbone untouched.

    Shapes: ``forward(x: [B, *D], t: [B] or float) -> [B, *D]``; ``energy(x, t) -> [B]``.
    """

    def __init__(self, backbone: nn.Module, sde: SDE, energy: str | Callable = "inner", time_input: str = "auto", *,
                 compact_silu: bool = True):
        super().__init__()
        if isinstance(energy, str):
            if energy not in ENERGIES:
                raise ValueError(f"energy must be one of {sorted(ENERGIES)} or a callable, got {energy!r}")
            self.energy_name, self._energy_fn = energy, ENERGIES[energy]
        elif callable(energy):
            self.energy_name, self._energy_fn = getattr(energy, "__name__", "custom"), energy
        else:
            raise TypeError(f"energy must be a name or a callable, got {type(energy).__name__}")
        if compact_silu:
            _convert_silu(backbone)
        self.backbone, self.sde, self.time_input = backbone, sde, time_input

    def energy(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``E_theta(x, t)``, shape ``[B]``."""
        t = time_tensor(t, x, batch=x.shape[0])
        with math_attention():
            f = call_backbone(self.backbone, x, t, self.sde, self.time_input).to(x.dtype)
        sigma = self.sde.sigma(t).to(x.dtype)
        return self._energy_fn(f, x, sigma) / sigma

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        grad, _ = input_gradient(self.energy, x, t)
        return -grad
