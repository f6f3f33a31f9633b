"""Scalar feature dictionaries for closed-form gradient projections (docs/theory.md §6).

A potential ``psi = sum_k a_k phi_k`` has gradient ``Phi(x) a`` with ``Phi(x) = [grad phi_1, ...]``
(``[B, d, K]``) and Laplacian ``lap(x) . a`` (``[B, K]``), both analytic here, so the Stein form of
the linear term needs no Hutchinson estimate. Inputs are standardised, ``z = (x - mu) / s``.

Families:
* ``poly``: ``z_i`` and ``z_i z_j`` (``i <= j``): every affine gradient field ``S x + c`` with ``S``
  symmetric, so the linear-Gaussian oracle (docs/theory.md §8) is represented exactly;
* ``rff``: random Fourier features ``cos(w_k . z + b_k)``, ``w_k ~ N(0, I / l^2)`` over several
  bandwidths ``l`` (multi-scale, so no bandwidth needs tuning).
"""
from __future__ import annotations

import math

import torch

__all__ = ["GradientFeatures", "MAX_FEATURE_DIM"]

MAX_FEATURE_DIM = 32   # the quadratic monomials (every linear gradient field) cost K = d (d + 3) / 2 features


class GradientFeatures:
    """A fixed dictionary of scalar features ``phi_k`` on ``R^d``.

    Args:
        mean, scale: standardisation ``[d]`` (``z = (x - mean) / scale``).
        poly: ``True``: linear and quadratic monomials; ``"linear"``: linear only; ``False``: none.
        num_rff: number of random Fourier features (0: none), split evenly over ``bandwidths``.
        bandwidths: length scales in standardised units.
        seed: seed of the random frequencies (features are deterministic given it).
    """

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, poly: bool = True, num_rff: int = 0,
                 bandwidths=(0.15, 0.3, 0.6, 1.2), seed: int = 0):
        self.mean = mean.to(torch.float64).flatten()
        self.scale = scale.to(torch.float64).flatten().clamp_min(1e-12)
        d = self.dim = self.mean.numel()
        if poly not in (True, False, "linear"):
            raise ValueError(f"poly must be True, False or 'linear', got {poly!r}")
        self.poly = poly
        self._iu = torch.triu_indices(d, d) if poly is True else torch.zeros(2, 0, dtype=torch.long)
        if num_rff:
            g = torch.Generator().manual_seed(seed)
            per = math.ceil(num_rff / len(bandwidths))
            ls = torch.tensor(bandwidths, dtype=torch.float64).repeat_interleave(per)[:num_rff]
            self.W = torch.randn(num_rff, d, generator=g, dtype=torch.float64) / ls[:, None]   # [R, d]
            self.b = 2 * math.pi * torch.rand(num_rff, generator=g, dtype=torch.float64)
            # Laplacian in x of cos(w . z + b) is -cos(.) sum_i w_i^2 / s_i^2
            self._w2 = (self.W**2 / self.scale[None] ** 2).sum(1)
        else:
            self.W = None
        self.num_features = (d if poly else 0) + self._iu.shape[1] + (0 if self.W is None else self.W.shape[0])

    @classmethod
    def default(cls, x: torch.Tensor, seed: int = 0) -> GradientFeatures:
        """Defaults from points ``x: [N, d]`` of the density: monomials of degree 1 and 2 plus 512 multi-scale
        Fourier features for ``d <= 8``; degree 1 and 2 for ``8 < d <= 32``. Above ``MAX_FEATURE_DIM`` a
        dictionary holding every linear gradient field costs ``N d K^2`` with ``K ~ d^2 / 2``: use the neural
        method (``neural.py``), which projects onto affine gradients in closed form."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        d = x.shape[1]
        if d > MAX_FEATURE_DIM:
            raise ValueError(f"closed-form features hold every linear gradient field only for d <= {MAX_FEATURE_DIM}, "
                             f"got d={d}; use method='neural'")
        if d <= 8:
            return cls(x.mean(0), x.std(0), poly=True, num_rff=512, seed=seed)
        return cls(x.mean(0), x.std(0), poly=True, num_rff=0, seed=seed)

    def __call__(self, x: torch.Tensor):
        """``x: [B, d]`` -> ``(Phi [B, d, K], lap [B, K])`` in float64 (gradients and Laplacians in ``x``)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        B, d = x.shape
        z = (x - self.mean) / self.scale
        grads, laps = [], []
        inv = 1.0 / self.scale                                                    # dz_i / dx_i
        if self.poly:
            eye = torch.diag(inv).expand(B, d, d)                                 # grad z_i = e_i / s_i
            grads.append(eye)
            laps.append(torch.zeros(B, d, dtype=x.dtype))
            i, j = self._iu
            # grad (z_i z_j) = z_j e_i / s_i + z_i e_j / s_j ; lap = 2 delta_ij / s_i^2
            gq = torch.zeros(B, d, i.numel(), dtype=x.dtype)
            cols = torch.arange(i.numel())
            gq[:, i, cols] += z[:, j] * inv[i]
            gq[:, j, cols] += z[:, i] * inv[j]
            grads.append(gq)
            laps.append(torch.where(i == j, 2 * inv[i] ** 2, torch.zeros_like(inv[i])).expand(B, -1))
        if self.W is not None:
            arg = z @ self.W.T + self.b                                           # [B, R]
            grads.append(-(self.W * inv[None]).T[None] * arg.sin()[:, None, :])   # [B, d, R]
            laps.append(-arg.cos() * self._w2[None])
        return torch.cat(grads, dim=2), torch.cat(laps, dim=1)
