"""Gaussian-mixture targets with exact scores and densities at every time (docs/theory.md §8).

Under a linear-Gaussian process ``x_t = alpha_t x_0 + sigma_t eps`` a mixture
``sum_k pi_k N(mu_k, Sigma_k)`` stays a mixture: ``p_t = sum_k pi_k N(alpha_t mu_k, C_k)`` with
``C_k = alpha_t^2 Sigma_k + sigma_t^2 I``. With ``Sigma_k = U_k diag(lam_k) U_k^T`` every ``C_k``
shares ``U_k``, so log-densities and scores are exact and cheap for per-sample times.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .sde import SDE, time_tensor

__all__ = ["GaussianMixture", "PRESETS", "add_zero_effect", "skew_matrix"]


class GaussianMixture:
    """``p_0 = sum_k pi_k N(mu_k, Sigma_k)`` in ``R^d``.

    Args:
        means: ``[K, d]``.
        covs: ``[K, d, d]`` symmetric positive definite (``None``: identity).
        weights: ``[K]`` positive (normalised here; ``None``: uniform).
    Methods take ``x: [B, d]`` and ``t`` a float or ``[B]`` tensor; ``sde=None`` means ``t = 0``.
    Computations run in float64 and return ``x``'s dtype.
    """

    def __init__(self, means: torch.Tensor | list, covs: torch.Tensor | list | None = None,
                 weights: torch.Tensor | list | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        K, d = means.shape
        if covs is None:
            covs = torch.eye(d, dtype=torch.float64).expand(K, d, d)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must be [K, d, d] = [{K}, {d}, {d}], got {tuple(covs.shape)}")
        if not torch.allclose(covs, covs.transpose(1, 2), atol=1e-10):
            raise ValueError("covs must be symmetric")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not torch.all(weights > 0):
            raise ValueError(f"weights must be [K] = [{K}] and positive, got {weights.tolist()}")
        lam, U = torch.linalg.eigh(covs)
        if not torch.all(lam > 0):
            raise ValueError("covs must be positive definite")
        self.means, self.covs, self.weights = means, covs.clone(), weights / weights.sum()
        self._lam, self._U = lam, U
        self._chol = torch.linalg.cholesky(self.covs)
        self.dim, self.num_components = d, K

    # ----------------------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` samples of ``p_0``, ``[n, d]``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], z)
        return x.to(dtype=dtype, device=device)

    def sample_marginal(self, n: int, t: float, sde: SDE, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` samples of ``p_t`` (``x_0 ~ p_0`` then the forward kernel)."""
        x0 = self.sample(n, generator=generator, dtype=torch.float64)
        xt, _ = sde.perturb(x0, torch.full((n,), float(t), dtype=torch.float64), generator=generator)
        return xt.to(dtype)

    # ----------------------------------------------------------------------------- densities
    def _terms(self, x: torch.Tensor, t: float | torch.Tensor, sde: SDE | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component log-density ``[B, K]`` and ``u_k = -C_k^-1 (x - alpha mu_k)`` ``[B, K, d]``."""
        x64 = (x if x.requires_grad else x.detach()).to(torch.float64).reshape(x.shape[0], -1)
        if x64.shape[1] != self.dim:
            raise ValueError(f"x must be [B, {self.dim}], got {tuple(x.shape)}")
        B = x64.shape[0]
        if sde is None:
            a = torch.ones(B, dtype=torch.float64, device=x.device)
            s = torch.zeros(B, dtype=torch.float64, device=x.device)
        else:
            tt = time_tensor(t, x64, batch=B).to(torch.float64)
            a, s = sde.alpha(tt), sde.sigma(tt)
        means, lam, U = (v.to(x.device) for v in (self.means, self._lam, self._U))
        diff = x64[:, None, :] - a[:, None, None] * means[None]                 # [B, K, d]
        z = torch.einsum("kji,bkj->bki", U, diff)                               # U_k^T diff
        var = a[:, None, None] ** 2 * lam[None] + s[:, None, None] ** 2         # [B, K, d] eigenvalues of C_k
        logN = -0.5 * (z**2 / var).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        u = -torch.einsum("kij,bkj->bki", U, z / var)                           # -C_k^-1 diff
        return logN + self.weights.to(x.device).log()[None], u

    def log_prob(self, x: torch.Tensor, t: float | torch.Tensor = 0.0, sde: SDE | None = None) -> torch.Tensor:
        """``log p_t(x)``, ``[B]``."""
        logw, _ = self._terms(x, t, sde)
        return torch.logsumexp(logw, dim=1).to(x.dtype)

    def score(self, x: torch.Tensor, t: float | torch.Tensor = 0.0, sde: SDE | None = None) -> torch.Tensor:
        """``grad log p_t(x) = sum_k gamma_k u_k`` with ``gamma = softmax(log pi_k + log N_k)``, ``[B, d]``."""
        logw, u = self._terms(x, t, sde)
        gamma = torch.softmax(logw, dim=1)
        return (gamma[..., None] * u).sum(1).to(x.dtype).reshape(x.shape)

    def score_fn(self, sde: SDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The exact score as a callable ``(x, t) -> [B, d]``."""
        return lambda x, t: self.score(x, t, sde)

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> GaussianMixture:
        """A named 2-D mixture: one of ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown mixture preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"


def _ring8():
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, 0.03 * torch.eye(2).expand(8, 2, 2))


def _grid9():
    g = torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64)
    means = torch.cartesian_prod(g, g)
    return GaussianMixture(means, 0.02 * torch.eye(2).expand(9, 2, 2))


def _pair():
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.0]], 0.1 * torch.eye(2).expand(2, 2, 2), [0.3, 0.7])


def _anisotropic():
    covs = torch.tensor([[[0.30, 0.20], [0.20, 0.20]], [[0.05, -0.02], [-0.02, 0.40]], [[0.10, 0.0], [0.0, 0.02]]])
    means = torch.tensor([[-1.2, -0.6], [1.2, -0.4], [0.0, 1.3]])
    return GaussianMixture(means, covs, [0.4, 0.35, 0.25])


PRESETS = {"ring8": _ring8, "grid9": _grid9, "pair": _pair, "anisotropic": _anisotropic}


# ----------------------------------------------------------------------------- zero-effect perturbation
def skew_matrix(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The block-rotation skew matrix ``J`` (``J^T = -J``): ``[[0, -1], [1, 0]]`` on coordinate pairs."""
    J = torch.zeros(d, d, dtype=dtype, device=device)
    for i in range(0, d - 1, 2):
        J[i, i + 1], J[i + 1, i] = -1.0, 1.0
    return J


def add_zero_effect(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], c: float,
                    J: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``s'(x, t) = s(x, t) + c J s(x, t)`` with ``J`` skew.

    When ``s = grad log p_t`` the added field ``c J grad log p_t`` satisfies ``div(p_t c J grad log p_t) = 0``
    (docs/theory.md §3): the L2 error is ``c^2 E|J grad log p_t|^2`` but no exact sampler notices.
    Works for ``x: [B, *D]`` (``J`` acts on the flattened ``D``; default ``skew_matrix``).
    """
    if J is not None and not torch.allclose(J, -J.T):
        raise ValueError("J must be skew-symmetric (J^T = -J)")

    def perturbed(x, t):
        s = score_fn(x, t)
        flat = s.reshape(s.shape[0], -1)
        Jm = skew_matrix(flat.shape[1], flat.dtype, flat.device) if J is None else J.to(flat)
        return s + c * (flat @ Jm.T).reshape(s.shape)

    return perturbed
