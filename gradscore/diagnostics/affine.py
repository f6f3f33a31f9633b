"""Closed-form projection onto affine gradient fields (docs/theory.md §6 and §8, the linear oracle).

An affine field ``a(x) = S (x - m) + mu`` is a gradient exactly when ``S`` is symmetric (its potential is
``1/2 (x - m)^T S (x - m) + mu . x``). The ``L^2(p)`` projection of a field ``v`` onto these fields, with
``m = E[x]`` and ``C = Cov(x)``, is ``mu = E[v]`` and ``S`` solving the Lyapunov equation
``C S + S C = B + B^T`` with ``B = E[v (x - m)^T]``. It is solved in the eigenbasis of ``C``
(``S~_ij = Q~_ij / (lam_i + lam_j)``), on the tensors' device. For the score error the moment ``B`` needs
no true score: Gaussian integration by parts gives ``E[grad log p (x - m)^T] = -I`` and ``E[grad log p] = 0``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimate import ustat_stderr

__all__ = ["AffineGradient", "Moments", "solve_lyapunov", "affine_norm_ustat"]


def solve_lyapunov(lam: torch.Tensor, V: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Symmetric ``S`` with ``C S + S C = Q`` for ``C = V diag(lam) V^T`` (``lam > 0``) and ``Q`` symmetric."""
    Qt = V.T @ Q @ V
    return V @ (Qt / (lam[:, None] + lam[None, :])) @ V.T


@dataclass
class Moments:
    """Mean ``m [d]`` and eigendecomposition ``C = V diag(lam) V^T`` of the points ``x [n, d]`` (float64)."""

    m: torch.Tensor
    lam: torch.Tensor
    V: torch.Tensor
    n: int

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        x = x.to(torch.float64)
        m = x.mean(0)
        xc = x - m
        return cls.from_sums(m, xc.T @ xc / x.shape[0], x.shape[0])

    @classmethod
    def from_sums(cls, m: torch.Tensor, C: torch.Tensor, n: int) -> Moments:
        lam, V = torch.linalg.eigh(C)
        floor = 1e-12 * lam.max().clamp_min(1e-300)
        return cls(m, lam.clamp_min(floor), V, n)

    @classmethod
    def of_halves(cls, chunks) -> tuple[Moments, Moments, Moments]:
        """Moments of the rows of an iterable of pairs ``(x_a [n_a, d], x_b [n_b, d])`` (float64 sums, nothing
        concatenated): ``(all, a, b)``. The halves ``a`` and ``b`` serve the bias correction of
        ``affine_norm_ustat``: draw them from disjoint halves of the data points."""
        sums = [[0, 0.0, 0.0], [0, 0.0, 0.0]]
        for pair in chunks:
            for acc, x in zip(sums, pair):
                x = x.reshape(x.shape[0], -1).to(torch.float64)
                acc[0] += x.shape[0]
                acc[1] = acc[1] + x.sum(0)
                acc[2] = acc[2] + x.T @ x

        def make(n, s1, s2):
            m = s1 / n
            return cls.from_sums(m, s2 / n - torch.outer(m, m), n)

        (na, s1a, s2a), (nb, s1b, s2b) = sums
        if na == 0 or nb == 0:
            raise ValueError("Moments.of_halves needs points in both halves")
        return make(na + nb, s1a + s1b, s2a + s2b), make(na, s1a, s2a), make(nb, s1b, s2b)


@dataclass
class AffineGradient:
    """The gradient field ``a(x) = S (x - m) + mu`` (``S`` symmetric ``[d, d]``, ``mu, m: [d]``)."""

    S: torch.Tensor
    mu: torch.Tensor
    m: torch.Tensor

    @classmethod
    def project(cls, x: torch.Tensor, v: torch.Tensor, moments: Moments,
                extra_cross: torch.Tensor | None = None) -> AffineGradient:
        """Least-squares projection of the field values ``v [n, d]`` at ``x [n, d]`` onto affine gradients.

        ``extra_cross`` ``[d, d]`` is added to the moment ``B = E[v (x - m)^T]`` (``I`` for the score error,
        whose true-score part contributes ``+I`` by integration by parts)."""
        x, v = x.to(torch.float64), v.to(torch.float64)
        mu = v.mean(0)
        B = (v - mu).T @ (x - moments.m) / x.shape[0]
        if extra_cross is not None:
            B = B + extra_cross
        return cls(solve_lyapunov(moments.lam, moments.V, B + B.T), mu, moments.m)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``a(x)`` for ``x: [n, d]`` -> ``[n, d]`` (float64)."""
        return (x.to(torch.float64) - self.m) @ self.S + self.mu

    def __sub__(self, other: AffineGradient) -> AffineGradient:
        return AffineGradient(self.S - other.S, self.mu - other.mu, self.m)

    def scale(self, c: float) -> AffineGradient:
        return AffineGradient(c * self.S, c * self.mu, self.m)

    def divergence(self) -> float:
        """``div a = tr S`` (a constant)."""
        return float(torch.trace(self.S))


def _kernel(B: torch.Tensor, mu: torch.Tensor, moments: Moments) -> torch.Tensor:
    """``P_jk = <S_j, B_k> + mu_j . mu_k`` (symmetrised) with ``S_j`` the Lyapunov solution of block ``j``."""
    S = torch.stack([solve_lyapunov(moments.lam, moments.V, b + b.T) for b in B])         # [n_b, d, d]
    P = torch.einsum("jab,kab->jk", S, B) + mu @ mu.T
    return (P + P.T) / 2


def affine_norm_ustat(B: torch.Tensor, mu: torch.Tensor, moments: Moments,
                      halves: tuple[Moments, Moments] | None = None) -> tuple[float, float]:
    """Unbiased ``||Pi_aff v||^2 = tr(S B) + |mu|^2`` from independent per-block moments, with its standard error.

    ``B: [n_b, d, d]`` holds each block's estimate of ``E[v (x - m)^T]`` and ``mu: [n_b, d]`` of ``E[v]`` (``m`` and
    ``C`` are ``moments``, from points independent of the blocks). The statistic is the U-statistic
    ``sum_{j != k} (<S_j, B_k> + mu_j . mu_k) / (n_b (n_b - 1))`` with ``S_j`` the Lyapunov solution of block ``j``:
    each product pairs two independent blocks, so the square of the Monte Carlo noise of the moments does not
    enter (a plug-in ``tr(S B)`` would be biased up by it, a fit-here-evaluate-there value biased down).
    Returns ``(value, stderr)``; the error is the U-statistic's Hoeffding variance (``ustat_stderr``)."""
    nb = B.shape[0]
    if nb < 4:
        raise ValueError(f"affine_norm_ustat needs at least 4 blocks, got {nb}")
    P = _kernel(B, mu, moments)
    if halves is not None:
        # the covariance enters through its inverse, biased by O(d / N) for N data points (fresh noise does not
        # average the data's own sampling error out); the bias is amplified because the norm is a difference of
        # terms of order tr(C^-1). Half-sample (Richardson) correction: bias(N / 2) = 2 bias(N), so
        # 2 U(N) - mean U(N / 2) removes the first order. U is linear in the kernel: one corrected kernel.
        ha, hb = (_kernel(B, mu, h) for h in halves)
        P = 2 * P - (ha + hb) / 2
    full = float((P.sum() - torch.diagonal(P).sum()) / (nb * (nb - 1)))
    se = ustat_stderr(P)
    return full, se
