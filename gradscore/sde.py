"""Forward diffusion processes over continuous time ``t in [0, 1]`` (THEORY section 1).

Every process is linear-Gaussian: ``x_t = alpha_t x_0 + sigma_t eps``, with forward SDE
``dx = f(x, t) dt + g(t) dW``. Shapes: ``x: [B, *D]``, ``t: [B]`` (a Python float or a 0-dim
tensor is broadcast). All per-time quantities return tensors shaped like ``t``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SDE", "VPSDE", "VESDE", "DiscreteVPSDE", "broadcast_to"]


def broadcast_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``[B]`` (or scalar) tensor so it broadcasts against ``x: [B, *D]``."""
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def _as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """A time as a tensor: floating tensors keep their dtype (moved to ``like``'s device); Python
    numbers take ``like``'s dtype and device (else the default dtype)."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype() if like is None else like.dtype)
        return t if like is None else t.to(device=like.device)
    dtype = torch.get_default_dtype() if like is None else like.dtype
    device = None if like is None else like.device
    return torch.tensor(float(t), dtype=dtype, device=device)


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
    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def g2(self, t) -> torch.Tensor:
        """Squared diffusion coefficient ``g(t)^2``."""
        raise NotImplementedError

    def drift_coef(self, t) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t) -> torch.Tensor:
        """``g(t)``."""
        return self.g2(t).sqrt()

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        """``f(x, t)`` for ``x: [B, *D]``."""
        return broadcast_to(self.drift_coef(_as_time(t, x)), x) * x

    # --- marginals -------------------------------------------------------------------------
    def perturb(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        """Sample ``x_t ~ p(x_t | x_0)``.

        Args:
            x0: clean data ``[B, *D]``.
            t: times ``[B]`` (or a float).
            noise: optional ``eps`` shaped like ``x0``; drawn from ``N(0, I)`` if omitted.
        Returns:
            ``(x_t, eps)``, both shaped like ``x0``.
        """
        t = _as_time(t, x0)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x0's shape {tuple(x0.shape)}")
        a, s = broadcast_to(self.alpha(t), x0), broadcast_to(self.sigma(t), x0)
        return a * x0 + s * noise, noise

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None,
                 dtype=None) -> torch.Tensor:
        """Training times ``t ~ U(t_min, T)``, shape ``[n]``."""
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.t_min + (self.T - self.t_min) * u

    # --- prior -----------------------------------------------------------------------------
    def prior_std(self) -> float:
        raise NotImplementedError

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None,
                     dtype=None) -> torch.Tensor:
        """Samples of the prior ``p_T ~ N(0, prior_std^2 I)``."""
        return self.prior_std() * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, prior_std^2 I)`` per sample, ``[B]``."""
        s = self.prior_std()
        d = x[0].numel()
        return -0.5 * x.flatten(1).pow(2).sum(1) / s**2 - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)

    # --- conditioning for networks -------------------------------------------------------
    def timestep(self, t) -> torch.Tensor:
        """The time value handed to a diffusers-style backbone (``999 t`` by default)."""
        return 999.0 * _as_time(t)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({fields})"

    def config(self) -> dict:
        raise NotImplementedError


class _VariancePreserving(SDE):
    """Shared by the VP processes: ``g^2 = beta(t)``, ``f = -beta(t) x / 2``, prior ``N(0, I)``.
    Subclasses define ``beta(t)``, ``alpha(t)`` and ``sigma(t)``."""

    def beta(self, t) -> torch.Tensor:
        raise NotImplementedError

    def g2(self, t):
        return self.beta(t)

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def prior_std(self):
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

    def beta(self, t) -> torch.Tensor:
        t = _as_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t) -> torch.Tensor:
        t = _as_time(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha(self, t):
        return self.log_alpha(t).exp()

    def sigma(self, t):
        # -expm1(2 log alpha) = 1 - alpha^2, accurate at small t
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()


    def config(self):
        return {"type": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "t_min": self.t_min}


class VESDE(SDE):
    """Variance-exploding process ``sigma_t = sigma_min (sigma_max / sigma_min)^t``, ``alpha_t = 1``,
    ``g^2 = d sigma_t^2 / dt``, prior ``N(0, sigma_max^2 I)``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max, self.t_min = float(sigma_min), float(sigma_max), float(t_min)

    def alpha(self, t):
        return torch.ones_like(_as_time(t))

    def sigma(self, t):
        t = _as_time(t)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def g2(self, t):
        return 2 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def drift_coef(self, t):
        return torch.zeros_like(_as_time(t))

    def prior_std(self):
        return self.sigma_max

    def config(self):
        return {"type": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "t_min": self.t_min}


class DiscreteVPSDE(_VariancePreserving):
    """The VP process of a discrete DDPM schedule (a diffusers scheduler's ``alphas_cumprod``).

    Integer step ``k in {0, ..., N-1}`` sits at ``t = k / (N - 1)`` with ``alpha_t^2 = alphas_cumprod[k]``;
    between steps ``log alpha_t^2`` is interpolated linearly, so ``beta(t) = g(t)^2`` is piecewise
    constant and ``int beta`` matches the schedule exactly at every step. ``timestep(t) = (N - 1) t``
    is what the diffusers model was trained with, so its UNet and pipelines plug in.

    Build it with ``DiscreteVPSDE.from_scheduler(DDPMScheduler(...))`` or from the tensor.
    """

    def __init__(self, alphas_cumprod, t_min: float | None = None):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1]")
        if not torch.all(ac[1:] <= ac[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing")
        self.alphas_cumprod = ac
        self.num_steps = ac.numel()
        self._log_ac = ac.log()
        self.t_min = 0.0 if t_min is None else float(t_min)
        self._cache: dict = {}

    @classmethod
    def from_scheduler(cls, scheduler, t_min: float | None = None) -> "DiscreteVPSDE":
        """From any diffusers scheduler exposing ``alphas_cumprod`` (DDPM, DDIM, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM-type scheduler")
        return cls(scheduler.alphas_cumprod, t_min=t_min)

    def _table(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self._log_ac.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _log_alpha2(self, t):
        t = _as_time(t)
        tab = self._table(t)
        u = (t.clamp(0, 1) * (self.num_steps - 1))
        k = u.floor().clamp(max=self.num_steps - 2).long()
        w = u - k
        return (1 - w) * tab[k] + w * tab[k + 1]

    def alpha(self, t):
        return (0.5 * self._log_alpha2(t)).exp()

    def sigma(self, t):
        return (-torch.expm1(self._log_alpha2(t))).sqrt()

    def beta(self, t):
        t = _as_time(t)
        tab = self._table(t)
        u = t.clamp(0, 1) * (self.num_steps - 1)
        k = u.floor().clamp(max=self.num_steps - 2).long()
        return -(tab[k + 1] - tab[k]) * (self.num_steps - 1)


    def timestep(self, t) -> torch.Tensor:
        return (self.num_steps - 1) * _as_time(t)

    def t_from_timestep(self, k) -> torch.Tensor:
        """Continuous time of a (possibly fractional) diffusers timestep ``k``."""
        return _as_time(k) / (self.num_steps - 1)

    def config(self):
        return {"type": "discrete_vp", "num_steps": self.num_steps, "t_min": self.t_min}
