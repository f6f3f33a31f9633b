"""Gaussian-mixture targets with exact scores and densities at every time (docs/theory.md §8).

Under a linear-Gaussian process ``x_t = alpha_t x_0 + sigma_t eps`` a mixture
``sum_k pi_k N(mu_k, Sigma_k)`` stays a mixture: ``p_t = sum_k pi_k N(alpha_t mu_k, C_k)`` with
``C_k = alpha_t^2 Sigma_k + sigma_t^2 I``. With ``Sigma_k = U_k diag(lam_k) U_k^T`` every ``C_k``
shares ``U_k``, so log-densities and scores are exact and cheap for per-sample times.
``ConditionalGaussianMixture`` is a label-indexed family ``p_0(x | y)``, one mixture per label, with the
exact conditional score per label and the exact marginal (null-label) score (docs/theory.md §8.7).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .sde import SDE, time_tensor

__all__ = ["GaussianMixture", "ConditionalGaussianMixture", "PRESETS", "CONDITIONAL_PRESETS", "add_zero_effect",
           "skew_matrix"]


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


# ----------------------------------------------------------------------------- conditional family
class ConditionalGaussianMixture:
    """A class-conditional target: label ``y`` in ``{0, ..., L-1}`` has its own mixture ``p_0(x | y)``.

    Args:
        mixtures: ``L`` ``GaussianMixture`` of one dimension ``d``.
        label_weights: ``[L]`` positive label probabilities (``None``: uniform).
    The label ``null_label = L`` stands for "no condition": its density and score are the marginal
    ``p_0(x) = sum_y pi_y p_0(x | y)`` (``marginal()``), what a guidance-trained model learns for a
    dropped label. Labels are an integer tensor ``class_labels: [B]`` aligned with ``x: [B, d]``;
    ``score_fn(sde)`` is the exact conditional score ``(x, t, class_labels) -> [B, d]``.
    """

    def __init__(self, mixtures: list[GaussianMixture], label_weights: torch.Tensor | list | None = None):
        mixtures = list(mixtures)
        if not mixtures or any(not isinstance(m, GaussianMixture) for m in mixtures):
            raise TypeError("mixtures must be a non-empty list of GaussianMixture")
        dims = {m.dim for m in mixtures}
        if len(dims) != 1:
            raise ValueError(f"every label's mixture must have one dimension, got {sorted(dims)}")
        L = len(mixtures)
        if label_weights is None:
            label_weights = torch.full((L,), 1.0 / L, dtype=torch.float64)
        label_weights = torch.as_tensor(label_weights, dtype=torch.float64)
        if label_weights.shape != (L,) or not torch.all(label_weights > 0):
            raise ValueError(f"label_weights must be [L] = [{L}] and positive, got {label_weights.tolist()}")
        self.mixtures, self.label_weights = mixtures, label_weights / label_weights.sum()
        self.num_labels, self.null_label, self.dim = L, L, dims.pop()
        self._marginal = GaussianMixture(
            torch.cat([m.means for m in mixtures]), torch.cat([m.covs for m in mixtures]),
            torch.cat([w * m.weights for w, m in zip(self.label_weights, mixtures)]))

    def marginal(self) -> GaussianMixture:
        """``p_0(x) = sum_y pi_y p_0(x | y)`` as one mixture (the null label's target)."""
        return self._marginal

    def _by_label(self, class_labels: torch.Tensor, batch: int) -> list[tuple[GaussianMixture, torch.Tensor]]:
        y = torch.as_tensor(class_labels)
        if y.shape != (batch,) or y.is_floating_point():
            raise ValueError(f"class_labels must be an integer tensor [B] = [{batch}], got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.null_label):
            raise ValueError(f"class_labels must lie in 0..{self.null_label} (null_label = {self.null_label}), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        mixtures = [*self.mixtures, self._marginal]
        return [(mixtures[k], (y == k).nonzero()[:, 0].to(y.device)) for k in y.unique().tolist()]

    def _per_label(self, method: str, x: torch.Tensor, t: float | torch.Tensor, sde: SDE | None,
                   class_labels: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        t_all = time_tensor(t, x, batch=x.shape[0])
        for mixture, idx in self._by_label(class_labels, x.shape[0]):
            out[idx] = getattr(mixture, method)(x[idx], t_all[idx], sde)
        return out

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n, d], y [n])``: labels ``y ~ pi`` then ``x ~ p_0(x | y)``."""
        y = torch.multinomial(self.label_weights, n, replacement=True, generator=generator)
        return self.sample_given(y, generator=generator, dtype=dtype), y

    def sample_given(self, class_labels: torch.Tensor, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x [n, d]`` with ``x_i ~ p_0(x | y_i)`` (the null label samples the marginal)."""
        y = torch.as_tensor(class_labels)
        x = torch.empty(y.shape[0], self.dim, dtype=dtype)
        for mixture, idx in self._by_label(y, y.shape[0]):
            x[idx] = mixture.sample(idx.numel(), generator=generator, dtype=dtype)
        return x

    def log_prob(self, x: torch.Tensor, t: float | torch.Tensor = 0.0, sde: SDE | None = None, *,
                 class_labels: torch.Tensor) -> torch.Tensor:
        """``log p_t(x | y)``, ``[B]``."""
        return self._per_label("log_prob", x, t, sde, class_labels, (x.shape[0],))

    def score(self, x: torch.Tensor, t: float | torch.Tensor = 0.0, sde: SDE | None = None, *,
              class_labels: torch.Tensor) -> torch.Tensor:
        """``grad_x log p_t(x | y)``, ``[B, d]`` (the marginal's score where ``y = null_label``)."""
        return self._per_label("score", x, t, sde, class_labels, tuple(x.shape))

    def score_fn(self, sde: SDE) -> Callable[..., torch.Tensor]:
        """The exact conditional score as a callable ``(x, t, class_labels) -> [B, d]``."""
        return lambda x, t, class_labels: self.score(x, t, sde, class_labels=class_labels)

    @classmethod
    def preset(cls, name: str) -> ConditionalGaussianMixture:
        """A named 2-D conditional family: one of ``CONDITIONAL_PRESETS``."""
        if name not in CONDITIONAL_PRESETS:
            raise ValueError(f"unknown conditional preset {name!r}; choose one of {sorted(CONDITIONAL_PRESETS)}")
        return CONDITIONAL_PRESETS[name]()

    def __repr__(self) -> str:
        return f"ConditionalGaussianMixture(L={self.num_labels}, d={self.dim})"


def _ring8_pairs():
    """ring8 split into 4 labels of 2 neighbouring components each (weights 0.2, 0.3, 0.25, 0.25)."""
    ring = _ring8()
    return ConditionalGaussianMixture(
        [GaussianMixture(ring.means[2 * y:2 * y + 2], ring.covs[2 * y:2 * y + 2], [0.4, 0.6]) for y in range(4)],
        [0.2, 0.3, 0.25, 0.25])


def _three_shapes():
    """3 labels: the pair, the anisotropic mixture, a single Gaussian."""
    return ConditionalGaussianMixture(
        [_pair(), _anisotropic(), GaussianMixture([[0.5, 1.5]], 0.05 * torch.eye(2)[None])])


CONDITIONAL_PRESETS = {"ring8_pairs": _ring8_pairs, "three_shapes": _three_shapes}


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
