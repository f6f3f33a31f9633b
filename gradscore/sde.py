"""Forward diffusion processes over continuous time ``t in [0, 1]`` (docs/theory.md §1).

Every process is linear-Gaussian: ``x_t = alpha_t x_0 + sigma_t eps``, with forward SDE
``dx = f(x, t) dt + g(t) dW``. Shapes: ``x: [B, *D]``, ``t: [B]`` (a Python float or a 0-dim
tensor is broadcast). All per-time quantities return tensors shaped like ``t``. ``time_tensor`` is
the one coercion of times that every module of the library uses.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["SDE", "VPSDE", "VESDE", "EDMSDE", "DiscreteVPSDE", "broadcast_to", "time_tensor"]


def broadcast_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``[B]`` (or scalar) tensor so it broadcasts against ``x: [B, *D]``."""
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def time_tensor(t: float | torch.Tensor, like: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
    """Times as a floating tensor: the one time coercion of the library.

    Args:
        t: a Python number, a 0-dim tensor or a ``[B]`` tensor of times.
        like: the tensor the times go with. They move to its device; Python numbers and integer
            tensors take its dtype (without ``like``: the default dtype and device). A floating tensor
            keeps its own dtype, so a float64 time evaluates a schedule in float64 next to float32 data.
        batch: ``None`` keeps the shape of ``t``. An integer ``B`` returns shape ``[B]``: a single time
            (number or 0-dim tensor) is repeated, a ``[B]`` tensor is kept, and any other shape raises
            ``ValueError`` naming it.
    """
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype() if like is None else like.dtype)
        if like is not None:
            t = t.to(device=like.device)
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        t = torch.tensor(float(t), dtype=torch.get_default_dtype() if like is None else like.dtype,
                         device=None if like is None else like.device)
    else:
        raise TypeError(f"t must be a number or a tensor of times, got {type(t).__name__}")
    if batch is None:
        return t
    if t.dim() == 0:
        return t.expand(batch).contiguous()
    if t.shape != (batch,):
        raise ValueError(f"t must be a single time or a [B] tensor with B={batch}, got shape {tuple(t.shape)}")
    return t


class SDE:
    """A linear-Gaussian forward process on ``t in [0, T]`` with ``T = 1``.

    Subclasses define ``alpha(t)``, ``sigma(t)``, ``g2(t)`` (the squared diffusion ``g(t)^2``) and
    ``drift_coef(t)`` (``f(x, t) = drift_coef(t) * x``), plus the prior ``p_T``.

    Attributes:
        T: final time (1.0).
        t_min: smallest time used for training and as the end of sampling (``sigma_t > 0`` there).
    """

    T: float = 1.0
    t_min: float = 1e-3

    # --- per-time coefficients -------------------------------------------------------------
    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g2(self, t: float | torch.Tensor) -> torch.Tensor:
        """Squared diffusion coefficient ``g(t)^2``."""
        raise NotImplementedError

    def drift_coef(self, t: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t: float | torch.Tensor) -> torch.Tensor:
        """``g(t)``."""
        return self.g2(t).sqrt()

    def drift(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``f(x, t)`` for ``x: [B, *D]``."""
        return broadcast_to(self.drift_coef(time_tensor(t, x)), x) * x

    # --- marginals -------------------------------------------------------------------------
    def perturb(self, x0: torch.Tensor, t: float | torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``x_t ~ p(x_t | x_0)``.

        Args:
            x0: clean data ``[B, *D]``.
            t: times ``[B]`` (or a float).
            noise: optional ``eps`` shaped like ``x0``; drawn from ``N(0, I)`` if omitted.
        Returns:
            ``(x_t, eps)``, both shaped like ``x0``.
        """
        t = time_tensor(t, x0)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x0's shape {tuple(x0.shape)}")
        a, s = broadcast_to(self.alpha(t), x0), broadcast_to(self.sigma(t), x0)
        return a * x0 + s * noise, noise

    def sample_time(self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Training times ``t ~ U(t_min, T)``, shape ``[n]``."""
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.t_min + (self.T - self.t_min) * u

    # --- prior -----------------------------------------------------------------------------
    def prior_std(self) -> float:
        raise NotImplementedError

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Samples of the prior ``p_T ~ N(0, prior_std^2 I)``."""
        return self.prior_std() * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, prior_std^2 I)`` per sample, ``[B]``."""
        s = self.prior_std()
        d = x[0].numel()
        return -0.5 * x.flatten(1).pow(2).sum(1) / s**2 - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)

    # --- conditioning for networks -------------------------------------------------------
    def timestep(self, t: float | torch.Tensor) -> torch.Tensor:
        """The time value handed to a diffusers-style backbone (``999 t`` by default)."""
        return 999.0 * time_tensor(t)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({fields})"

    def config(self) -> dict[str, float | int | str]:
        raise NotImplementedError


class _VariancePreserving(SDE):
    """Shared by the VP processes: ``g^2 = beta(t)``, ``f = -beta(t) x / 2``, prior ``N(0, I)``.
    Subclasses define ``beta(t)``, ``alpha(t)`` and ``sigma(t)``."""

    def beta(self, t: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g2(self, t: float | torch.Tensor) -> torch.Tensor:
        return self.beta(t)

    def drift_coef(self, t: float | torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def prior_std(self) -> float:
        return 1.0


class VPSDE(_VariancePreserving):
    """Variance-preserving process with linear ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``alpha_t = exp(-1/2 int_0^t beta)``, ``sigma_t^2 = 1 - alpha_t^2``, ``g^2 = beta``,
    ``f = -beta x / 2``, prior ``N(0, I)``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 <= beta_min <= beta_max:
            raise ValueError(f"VPSDE needs 0 <= beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def beta(self, t: float | torch.Tensor) -> torch.Tensor:
        t = time_tensor(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        t = time_tensor(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        # -expm1(2 log alpha) = 1 - alpha^2, accurate at small t
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def config(self) -> dict[str, float | int | str]:
        return {"type": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "t_min": self.t_min}


class VESDE(SDE):
    """Variance-exploding process ``sigma_t = sigma_min (sigma_max / sigma_min)^t``, ``alpha_t = 1``,
    ``g^2 = d sigma_t^2 / dt``, prior ``N(0, sigma_max^2 I)``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max, self.t_min = float(sigma_min), float(sigma_max), float(t_min)

    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        return torch.ones_like(time_tensor(t))

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        t = time_tensor(t)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def g2(self, t: float | torch.Tensor) -> torch.Tensor:
        return 2 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def drift_coef(self, t: float | torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(time_tensor(t))

    def prior_std(self) -> float:
        return self.sigma_max

    def config(self) -> dict[str, float | int | str]:
        return {"type": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "t_min": self.t_min}


class EDMSDE(VESDE):
    """EDM's process (Karras et al. 2022; docs/theory.md §9.4): ``x = x_0 + sigma n`` (a VE process in ``sigma``),
    with EDM's training distribution and network conditioning.

    ``sigma_t = sigma_min (sigma_max / sigma_min)^t`` (``VESDE``; defaults EDM's ``[0.002, 80]``), so ``log sigma_t``
    is affine in ``t``; ``sample_time`` draws EDM's lognormal noise levels, ``log sigma ~ N(P_mean, P_std^2)``
    restricted to ``[sigma(t_min), sigma_max]`` (exactly, by the inverse normal CDF), returned as times;
    ``timestep(t) = c_noise = log(sigma_t) / 4``, the time input of EDM's networks. ``sigma_data`` is the data
    standard deviation used by ``ScoreModel(output="edm")`` and ``weighting="edm"``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 P_mean: float = -1.2, P_std: float = 1.2, t_min: float = 0.0):
        super().__init__(sigma_min, sigma_max, t_min=t_min)
        if not sigma_data > 0 or not P_std > 0:
            raise ValueError(f"EDMSDE needs sigma_data > 0 and P_std > 0, got sigma_data={sigma_data}, P_std={P_std}")
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)

    def sample_time(self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Times whose noise levels are lognormal, ``log sigma_t ~ N(P_mean, P_std^2)`` restricted to
        ``[log sigma(t_min), log sigma_max]``; shape ``[n]``."""
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        lo = (math.log(self.sigma_min) + self.t_min * log_ratio - self.P_mean) / self.P_std
        hi = (math.log(self.sigma_max) - self.P_mean) / self.P_std
        cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))                  # noqa: E731
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        z = torch.special.ndtri(cdf(lo) + (cdf(hi) - cdf(lo)) * u)
        t = (self.P_mean + self.P_std * z - math.log(self.sigma_min)) / log_ratio
        return t.clamp(self.t_min, self.T).to(dtype or torch.get_default_dtype())

    def timestep(self, t: float | torch.Tensor) -> torch.Tensor:
        """EDM's ``c_noise = log(sigma_t) / 4``."""
        return self.sigma(t).log() / 4

    def config(self) -> dict[str, float | int | str]:
        return {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data,
                "P_mean": self.P_mean, "P_std": self.P_std, "t_min": self.t_min}


def _pchip_slopes(y: torch.Tensor) -> torch.Tensor:
    """Slopes at unit-spaced knots of the monotone cubic (PCHIP, Fritsch-Carlson) interpolant of ``y: [N]``.

    Interior: the harmonic mean of the neighbouring secants where they have one sign, else 0; ends: the
    one-sided three-point formula, limited so the interpolant stays monotone (the rules of
    ``scipy.interpolate.PchipInterpolator``). Monotone data give a monotone interpolant."""
    delta = y[1:] - y[:-1]
    if y.numel() == 2:
        return torch.stack([delta[0], delta[0]])
    a, b = delta[:-1], delta[1:]
    same_sign = (a * b) > 0
    harmonic = 2 * a * b / torch.where(same_sign, a + b, torch.ones_like(a))
    interior = torch.where(same_sign, harmonic, torch.zeros_like(a))

    def end(d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        m = (3 * d0 - d1) / 2
        if torch.sign(m) != torch.sign(d0):
            return torch.zeros_like(m)
        if torch.sign(d0) != torch.sign(d1) and m.abs() > 3 * d0.abs():
            return 3 * d0
        return m

    return torch.cat([end(delta[0], delta[1])[None], interior, end(delta[-1], delta[-2])[None]])


class DiscreteVPSDE(_VariancePreserving):
    """The VP process of a discrete DDPM schedule (a diffusers scheduler's ``alphas_cumprod``).

    Integer step ``k in {0, ..., N-1}`` sits at ``t = k / (N - 1)`` with ``alpha_t^2 = alphas_cumprod[k]``
    exactly. Between steps ``log alpha_t^2`` is the monotone cubic (PCHIP) interpolant of
    ``log alphas_cumprod`` over the step grid, and ``beta(t) = g(t)^2 = -d/dt log alpha_t^2`` is its
    derivative: continuous and non-negative, so ODE and SDE solvers keep their order of convergence (a
    piecewise-constant beta would stop their error from shrinking with more steps). ``int beta`` over
    each step interval matches the schedule exactly. ``timestep(t) = (N - 1) t`` is what the diffusers
    model was trained with, so its UNet and pipelines plug in.

    Build it with ``DiscreteVPSDE.from_scheduler(DDPMScheduler(...))`` or from the tensor.
    """

    def __init__(self, alphas_cumprod: torch.Tensor | list[float], t_min: float | None = None):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1]")
        if not torch.all(ac[1:] <= ac[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing")
        self.alphas_cumprod = ac
        self.num_steps = ac.numel()
        y = ac.log()
        m = _pchip_slopes(y)
        delta = y[1:] - y[:-1]
        # per step interval, log alpha^2 = c0 + c1 s + c2 s^2 + c3 s^3 with s in [0, 1] the fraction of the step
        self._coef = torch.stack([y[:-1], m[:-1], 3 * delta - 2 * m[:-1] - m[1:], m[:-1] + m[1:] - 2 * delta], 1)
        self.t_min = 0.0 if t_min is None else float(t_min)
        self._cache: dict = {}

    @classmethod
    def from_scheduler(cls, scheduler: Any, t_min: float | None = None) -> DiscreteVPSDE:
        """From any diffusers scheduler exposing ``alphas_cumprod`` (DDPM, DDIM, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM-type scheduler")
        return cls(scheduler.alphas_cumprod, t_min=t_min)

    def _segment(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coefficients [..., 4], s)``: the cubic of the step interval holding ``t`` and the fraction ``s``."""
        t = time_tensor(t)
        key = (t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = self._coef.to(device=t.device, dtype=t.dtype)
        u = t.clamp(0, 1) * (self.num_steps - 1)
        k = u.floor().clamp(max=self.num_steps - 2).long()
        return self._cache[key][k], u - k

    def log_alpha2(self, t: float | torch.Tensor) -> torch.Tensor:
        """``log alpha_t^2``, the PCHIP interpolant of ``log alphas_cumprod``."""
        c, s = self._segment(t)
        return c[..., 0] + s * (c[..., 1] + s * (c[..., 2] + s * c[..., 3]))

    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        return (0.5 * self.log_alpha2(t)).exp()

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        return (-torch.expm1(self.log_alpha2(t))).sqrt()

    def beta(self, t: float | torch.Tensor) -> torch.Tensor:
        c, s = self._segment(t)
        return -(self.num_steps - 1) * (c[..., 1] + s * (2 * c[..., 2] + 3 * s * c[..., 3]))

    def timestep(self, t: float | torch.Tensor) -> torch.Tensor:
        return (self.num_steps - 1) * time_tensor(t)

    def t_from_timestep(self, k: float | torch.Tensor) -> torch.Tensor:
        """Continuous time of a (possibly fractional) diffusers timestep ``k``."""
        return time_tensor(k) / (self.num_steps - 1)

    def config(self) -> dict[str, float | int | str]:
        return {"type": "discrete_vp", "num_steps": self.num_steps, "t_min": self.t_min}
