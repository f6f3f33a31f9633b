"""Turning any backbone into a score callable ``(x, t, **cond) -> score`` (docs/theory.md §1, §7 and §9).

A *backbone* maps ``(x, time, **cond)`` to a tensor shaped like ``x`` or to one scalar per sample.
``ScoreModel`` reads its output as a noise (``eps``), score, clean-data (``x0``), velocity (``v``:
``v = alpha eps - sigma x0``) or EDM (``F`` of ``D = c_skip x + c_out F(c_in x, c_noise)``) prediction;
``EnergyScore`` as an energy whose negative input gradient is the score. Conditioning keywords
(``class_labels=y``, ``encoder_hidden_states=h``: per-sample tensors aligned with ``x``) go to the
backbone unchanged, so diffusers models take theirs by their own names.

Time units (``time_input``): ``"t"`` passes continuous ``t: [B]`` in ``[0, 1]``, ``"timestep"`` passes
``sde.timestep(t)`` (a diffusers model's timesteps). ``"auto"`` decides only when it can know
(``resolve_time_input``): a diffusers model at the top level gets timesteps; a module that sets the
attribute ``time_input = "t" | "timestep"`` gets what it declares; a module with no diffusers model
inside gets ``t``; and a module *wrapping* a diffusers model raises, asking for the unit, since it
may pass ``t`` straight to a model expecting timesteps (a silent unit mismatch).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .double_backward import attention_chunk_bytes, input_gradient, math_attention, silu_mlp_vjp, time_mlp_layers
from .double_backward import compact_silu as _convert_silu
from .sde import SDE, broadcast_to, time_tensor

__all__ = ["ScoreModel", "EnergyScore", "call_backbone", "resolve_time_input", "edm_coefficients", "ENERGIES",
           "TIME_INPUTS"]

TIME_INPUTS = ("auto", "t", "timestep")


def _is_diffusers(module: object) -> bool:
    return any(c.__module__.startswith("diffusers") for c in type(module).__mro__)


def resolve_time_input(backbone: Callable, time_input: str = "auto") -> str:
    """The time unit ``"t"`` or ``"timestep"`` a backbone is called with.

    ``"t"`` and ``"timestep"`` are returned as given. ``"auto"``: the backbone's own ``time_input``
    attribute when it sets one (``"t"`` or ``"timestep"``); ``"timestep"`` for a diffusers model
    (``ModelMixin``) at the top level; ``"t"`` for anything without a diffusers model inside
    (``TimeMLP``, a function). A module holding a diffusers model as a submodule raises ``ValueError``:
    whether it converts ``t`` into timesteps itself cannot be seen from outside.
    """
    if time_input not in TIME_INPUTS:
        raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
    if time_input != "auto":
        return time_input
    declared = getattr(backbone, "time_input", None)
    if declared is not None and not isinstance(backbone, (ScoreModel, EnergyScore)):
        if declared not in ("t", "timestep"):
            raise ValueError(f"{type(backbone).__name__}.time_input must be 't' or 'timestep', got {declared!r}")
        return declared
    if _is_diffusers(backbone):
        return "timestep"
    if isinstance(backbone, nn.Module):
        inner = next(((name, m) for name, m in backbone.named_modules() if name and _is_diffusers(m)), None)
        if inner is not None:
            raise ValueError(
                f"time_input='auto' cannot tell the time unit of {type(backbone).__name__}: it wraps the diffusers "
                f"model {type(inner[1]).__name__} (at {inner[0]!r}), which expects timesteps (sde.timestep(t)), but "
                f"{type(backbone).__name__} may pass its time on unchanged. Pass time_input='t' (it receives t in "
                "[0, 1]) or time_input='timestep' (it receives sde.timestep(t)), or set the attribute "
                f"{type(backbone).__name__}.time_input = 't' | 'timestep'")
    return "t"


def _unwrap_output(out: Any) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def call_backbone(backbone: Callable, x: torch.Tensor, t: float | torch.Tensor, sde: SDE,
                  time_input: str = "auto", **cond: Any) -> torch.Tensor:
    """Evaluate ``backbone(x, time, **cond)`` at ``(x, t)`` with ``t: [B]`` continuous time.

    ``time`` is ``t`` or ``sde.timestep(t)`` as ``resolve_time_input(backbone, time_input)`` decides.
    ``cond``: conditioning keywords passed unchanged (per-sample tensors ``[B, ...]``). Outputs with a
    ``.sample`` field (diffusers) or tuples are unwrapped.
    """
    t = time_tensor(t, x, batch=x.shape[0])
    mode = resolve_time_input(backbone, time_input)
    return _unwrap_output(backbone(x, sde.timestep(t) if mode == "timestep" else t, **cond))


def check_cond(cond: dict[str, Any], batch: int, where: str) -> None:
    """Every tensor of ``cond`` must be per-sample, ``[B, ...]`` with ``B = batch``; raises naming the key."""
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != batch):
            raise ValueError(f"{where}: conditioning {key!r} has shape {tuple(value.shape)}, expected one entry per "
                             f"sample, [{batch}, ...] (aligned with x)")


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM's preconditioning ``(c_skip, c_out, c_in, c_noise)`` at noise level ``sigma`` (docs/theory.md §9.4):
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma) / 4``; shapes like ``sigma``."""
    sd2 = sigma_data**2
    norm = (sigma**2 + sd2).sqrt()
    return sd2 / (sigma**2 + sd2), sigma * sigma_data / norm, 1 / norm, sigma.log() / 4


class ScoreModel(nn.Module):
    """Score from a backbone predicting noise, score, clean data, velocity or EDM's ``F``.

    With ``x_t = alpha_t x0 + sigma_t eps`` (docs/theory.md §1, §9.3, §9.4):

    * ``output="eps"``: ``score = -eps_hat / sigma_t``;
    * ``"score"``: the output is the score;
    * ``"x0"``: ``score = (alpha_t x0_hat - x) / sigma_t^2``;
    * ``"v"`` (diffusers' ``v_prediction``, ``v = alpha_t eps - sigma_t x0``):
      ``eps_hat = (sigma_t x + alpha_t v_hat) / (alpha_t^2 + sigma_t^2)`` (the denominator is 1 for VP
      processes), ``score = -eps_hat / sigma_t``;
    * ``"edm"``: EDM's preconditioning on the equivalent VE variable ``x~ = x / alpha_t`` at noise
      ``s = sigma_t / alpha_t``: ``D = c_skip x~ + c_out F(c_in x~, c_noise)`` (``edm_coefficients``),
      ``score = (D - x~) / (s^2 alpha_t)``. The backbone always receives ``c_noise = log(s) / 4`` as its
      time (``time_input`` must be ``"auto"``); ``sigma_data`` defaults to ``sde.sigma_data`` (``EDMSDE``).

    Args:
        backbone: module ``(x, time, **cond) -> [B, *D]`` (see ``call_backbone``).
        sde: the forward process.
        output: one of ``OUTPUTS``.
        time_input: ``"auto"``, ``"t"`` or ``"timestep"`` (``resolve_time_input``; checked here, once).
        sigma_data: the data standard deviation of ``output="edm"``.
    Shapes: ``forward(x: [B, *D], t: [B] or float, **cond) -> [B, *D]``; ``cond`` goes to the backbone.
    """

    OUTPUTS = ("eps", "score", "x0", "v", "edm")

    def __init__(self, backbone: nn.Module, sde: SDE, output: str = "eps", time_input: str = "auto",
                 sigma_data: float | None = None):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        if output == "edm":
            if time_input != "auto":
                raise ValueError(f"output='edm' calls the backbone with EDM's c_noise = log(sigma) / 4 as its time; "
                                 f"time_input must stay 'auto', got {time_input!r}")
            sigma_data = getattr(sde, "sigma_data", None) if sigma_data is None else sigma_data
            if sigma_data is None or not sigma_data > 0:
                raise ValueError("output='edm' needs sigma_data > 0 (the data standard deviation): pass "
                                 f"sigma_data= or use gradscore.EDMSDE, got {sigma_data!r}")
            self.sigma_data = float(sigma_data)
        else:
            if sigma_data is not None:
                raise ValueError(f"sigma_data is used by output='edm' only, got it with output={output!r}")
            time_input = resolve_time_input(backbone, time_input)
            self.sigma_data = None
        self.backbone, self.sde, self.output, self.time_input = backbone, sde, output, time_input

    def forward(self, x: torch.Tensor, t: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        if self.output == "edm":
            return self._edm_score(x, t, cond)
        out = call_backbone(self.backbone, x, t, self.sde, self.time_input, **cond)
        out = self._check(out, x)
        if self.output == "score":
            return out
        sigma = broadcast_to(self.sde.sigma(t).to(x.dtype), x)      # x's dtype even when t is wider
        if self.output == "eps":
            return -out / sigma
        alpha = broadcast_to(self.sde.alpha(t).to(x.dtype), x)
        if self.output == "x0":
            return (alpha * out - x) / sigma**2
        eps = (sigma * x + alpha * out) / (alpha**2 + sigma**2)      # "v"
        return -eps / sigma

    @staticmethod
    def _check(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.shape != x.shape:
            raise ValueError(f"backbone output has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def _edm_score(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        alpha, sigma_t = self.sde.alpha(t).to(x.dtype), self.sde.sigma(t).to(x.dtype)
        s = sigma_t / alpha                                          # the VE noise level of x / alpha_t
        c_skip, c_out, c_in, c_noise = (broadcast_to(c, x) if i < 3 else c
                                        for i, c in enumerate(edm_coefficients(s, self.sigma_data)))
        x_ve = x / broadcast_to(alpha, x)
        f = self._check(_unwrap_output(self.backbone(c_in * x_ve, c_noise, **cond)), x)
        denoised = c_skip * x_ve + c_out * f
        return (denoised - x_ve) / broadcast_to(s**2 * alpha, x)


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


def _energy_auto(f, x, sigma):
    if f.shape == x.shape:
        return _energy_inner(f, x, sigma)
    if f.dim() == 1 or (f.dim() == 2 and f.shape[1] == 1):
        return _energy_scalar(f, x, sigma)
    raise ValueError(f"energy='auto' needs a backbone output shaped like x {tuple(x.shape)} (inner-product energy) "
                     f"or one scalar per sample [{x.shape[0]}] (the energy itself), got {tuple(f.shape)}")


ENERGIES = {
    "auto": _energy_auto,          # "scalar" for a [B] (or [B, 1]) output, "inner" for an output shaped like x
    "scalar": _energy_scalar,      # E~ = f(x, t)                         (backbone returns [B])
    "norm": _energy_norm,          # E~ = |f(x, t)|^2 / 2
    "inner": _energy_inner,        # E~ = <x, f(x, t)> / 2                 (exact for symmetric linear f)
    "residual": _energy_residual,  # E~ = |x - f(x, t)|^2 / (2 sigma_t)    (f predicts alpha_t x0)
}


class EnergyScore(nn.Module):
    """Conservative score ``s = -grad_x E_theta(x, t)`` around any backbone (docs/theory.md §7).

    The energy is ``E = E~(f(x, t), x) / sigma_t`` with ``E~`` one of ``ENERGIES`` (a name or a
    callable ``(f, x, sigma_t: [B]) -> [B]``); the default ``"auto"`` takes a scalar output (``[B]`` or
    ``[B, 1]``) as the energy itself and an output shaped like ``x`` through the inner-product energy
    ``<x, f> / 2``. Conditioning keywords (``**cond``) go to the backbone unchanged.
    The gradient is taken inside ``forward`` with
    ``create_graph`` whenever grad mode is on (training), on a copy of ``x`` (never mutated);
    attention runs on the math kernel so diffusers UNets with attention blocks double-backward.
    In training every parameter that enters ``E`` gets a gradient (an exact zero for one that only
    shifts ``E`` by a constant in ``x``), so DDP works without ``find_unused_parameters``.
    With ``compact_silu=True`` (the default) the backbone's ``nn.SiLU`` modules are converted to
    ``CompactSiLU`` in place (``double_backward.compact_silu``: same function, same state dict; the
    double backward saves less memory, see BENCHMARKS.md, "Fast paths tried"); ``compact_silu=False``
    leaves the backbone untouched. ``attention_chunk_bytes`` (set from the backbone,
    ``double_backward.attention_chunk_bytes``; ``None`` turns it off) sends unmasked attention calls to
    ``double_backward.twice_differentiable_attention`` (its second derivative written out: nothing of the scores' size
    saved; ``attention_written_derivative = False`` keeps the math kernel's) and runs the others on slices of the
    batch (same values, a smaller double-backward peak). A ``TimeMLP`` backbone through the inner-product energy
    takes its input gradient as one fused node in training (``double_backward.silu_mlp_vjp``: the same values and
    gradients with fewer operators); ``fused_input_gradient = False`` keeps the general route.

    Shapes: ``forward(x: [B, *D], t: [B] or float, **cond) -> [B, *D]``; ``energy(x, t, **cond) -> [B]``.
    """

    def __init__(self, backbone: nn.Module, sde: SDE, energy: str | Callable = "auto", time_input: str = "auto", *,
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
        self.backbone, self.sde, self.time_input = backbone, sde, resolve_time_input(backbone, time_input)
        self.attention_chunk_bytes = attention_chunk_bytes(backbone)
        self.attention_written_derivative = True     # twice_differentiable_attention (False: the math kernel's)
        self.fused_input_gradient = True             # a TimeMLP inner energy: one fused node (False: input_gradient)

    def energy(self, x: torch.Tensor, t: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """``E_theta(x, t | cond)``, shape ``[B]``."""
        t = time_tensor(t, x, batch=x.shape[0])
        with math_attention(self.attention_chunk_bytes, self.attention_written_derivative):
            f = call_backbone(self.backbone, x, t, self.sde, self.time_input, **cond).to(x.dtype)
        sigma = self.sde.sigma(t).to(x.dtype)
        return self._energy_fn(f, x, sigma) / sigma

    def forward(self, x: torch.Tensor, t: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        layers = None if cond else self._silu_mlp_layers(x)
        if layers is not None:
            return self._silu_mlp_score(x, t, *layers)
        grad, _ = input_gradient(lambda x_, t_: self.energy(x_, t_, **cond), x, t)
        return -grad

    # The toy's energy, a TimeMLP through the inner-product energy: grad_x E = (f + J_f^T x) / (2 sigma_t) with
    # J_f^T x through one fused node (double_backward.silu_mlp_vjp), the same function and gradients as
    # input_gradient with fewer operators (tests/test_fast_paths.py; BENCHMARKS.md, "Fast paths tried").
    def _silu_mlp_layers(self, x: torch.Tensor):
        inner = self.energy_name == "inner" or (self.energy_name == "auto" and x[0].numel() != 1)
        if not (self.fused_input_gradient and inner):
            return None
        return time_mlp_layers(self.backbone, x, self.time_input, x[0].numel())

    def _silu_mlp_score(self, x, t, linears, head):
        half = 0.5 / self.sde.sigma(t).to(x.dtype)[:, None]                # 1 / (2 sigma_t)
        xf = x.reshape(x.shape[0], -1)
        g, h = silu_mlp_vjp(self.backbone.net_input(x, t), xf.shape[1], linears, (xf * half).mm(head.weight))
        return torch.addcmul(g, head(h), half).neg().reshape(x.shape)      # -(f + J_f^T x) / (2 sigma_t)
