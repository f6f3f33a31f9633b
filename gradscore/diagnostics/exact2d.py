"""Exact weighted Helmholtz-Hodge decomposition of a 2-D score error on a grid (docs/theory.md §2 and §8).

Finite volumes on an ``n x n`` cell-centred grid over a box: for every cell ``C``,
``sum_faces p_f (phi_nb - phi_C) = h sum_faces p_f (e . nu)_f`` (the discrete ``div(p grad phi) =
div(p e)``), with ``p_f`` and ``(e . nu)_f`` the averages of the two neighbouring cells and no flux
through the box boundary (choose a box where ``p`` is negligible at the edge). The sparse symmetric
system is solved with ``phi`` pinned at the densest cell (the constant is its null space). The
gradient part is ``grad phi`` (face differences averaged to cell centres), the solenoidal part
``e - grad phi``; norms are ``sum_C p_C |.|^2 / sum_C p_C``. Second order in ``h``: use it as the ground
truth for the Monte Carlo estimators.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from ..sde import SDE
from ..toy import GaussianMixture

__all__ = ["GridDecomposition", "exact_decomposition_2d"]


@dataclass
class GridDecomposition:
    """Grid fields (``[n, n]`` or ``[n, n, 2]``, index ``[i, j]`` = ``(xs[i], ys[j])``) and norms under ``p``."""

    xs: np.ndarray
    ys: np.ndarray
    density: np.ndarray          # p at cell centres, normalised to sum 1
    error: np.ndarray            # e = s_theta - grad log p
    potential: np.ndarray        # phi (gradient part = grad phi)
    gradient_part: np.ndarray
    solenoidal_part: np.ndarray
    gradient_norm2: float        # ||Pi_G e||_p^2
    solenoidal_norm2: float      # ||Pi_S e||_p^2
    l2_norm2: float              # ||e||_p^2

    def points(self) -> np.ndarray:
        """Cell centres ``[n * n, 2]`` in the order of ``field.reshape(-1, ...)``."""
        X, Y = np.meshgrid(self.xs, self.ys, indexing="ij")
        return np.stack([X.ravel(), Y.ravel()], 1)


def _default_bounds(mix: GaussianMixture, t: float, sde: SDE | None, width: float = 6.0):
    if sde is None:
        a, s = 1.0, 0.0
    else:
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, s = float(sde.alpha(tt)), float(sde.sigma(tt))
    means = a * mix.means
    std = (a**2 * torch.diagonal(mix.covs, dim1=1, dim2=2) + s**2).sqrt()
    lo = (means - width * std).min(0).values
    hi = (means + width * std).max(0).values
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def exact_decomposition_2d(score_fn, target, t: float = 0.0, sde: SDE | None = None, *, true_score=None,
                           bounds=None, n: int = 200) -> GridDecomposition:
    """Decompose ``e = score_fn(., t) - grad log p_t`` on a grid.

    Args:
        score_fn: ``(x [B, 2], t [B]) -> [B, 2]``, the model.
        target: a ``GaussianMixture`` (``p_t`` under ``sde``; ``sde=None`` means ``t = 0``) or a callable
            ``log_p(x [B, 2]) -> [B]`` of the density at time ``t`` (unnormalised is fine).
        true_score: ``(x, t) -> [B, 2]``; default: the mixture's exact score, or ``grad log_p`` by autograd.
        bounds: ``((x_lo, x_hi), (y_lo, y_hi))``; default for a mixture: 6 standard deviations around
            every component of ``p_t``; required for a callable.
        n: cells per side.
    """
    if isinstance(target, GaussianMixture):
        if target.dim != 2:
            raise ValueError(f"target must be a 2-D mixture, got d={target.dim}")
        log_p = lambda x: target.log_prob(x, t, sde)  # noqa: E731
        if true_score is None:
            true_score = lambda x, tt: target.score(x, tt, sde)  # noqa: E731
        if bounds is None:
            bounds = _default_bounds(target, t, sde)
    elif callable(target):
        log_p = target
        if bounds is None:
            raise ValueError("bounds=((x_lo, x_hi), (y_lo, y_hi)) is required when target is a log-density callable")
        if true_score is None:
            def true_score(x, tt):
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    return torch.autograd.grad(log_p(xg).sum(), xg)[0].detach()
    else:
        raise TypeError(f"target must be a GaussianMixture or a log-density callable, got {type(target).__name__}")
    if n < 8:
        raise ValueError(f"n must be >= 8 cells per side, got {n}")
    (x_lo, x_hi), (y_lo, y_hi) = bounds
    hx, hy = (x_hi - x_lo) / n, (y_hi - y_lo) / n
    xs = x_lo + (np.arange(n) + 0.5) * hx
    ys = y_lo + (np.arange(n) + 0.5) * hy
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    pts = torch.from_numpy(np.stack([X.ravel(), Y.ravel()], 1))
    tt = torch.full((pts.shape[0],), float(t), dtype=torch.float64)
    with torch.no_grad():
        logp = log_p(pts).to(torch.float64).numpy()
    e = (score_fn(pts, tt).detach().to(torch.float64) - true_score(pts, tt).detach().to(torch.float64)).numpy()
    p = np.exp(logp - logp.max())
    p = (p / p.sum()).reshape(n, n)
    e = e.reshape(n, n, 2)

    idx = np.arange(n * n).reshape(n, n)
    floor = 1e-14 * p.max()
    rows, cols, vals = [], [], []
    rhs = np.zeros(n * n)
    diag = np.zeros(n * n)
    # x-faces between (i, j) and (i + 1, j); y-faces between (i, j) and (i, j + 1)
    for axis, h in ((0, hx), (1, hy)):
        a = idx[:-1, :] if axis == 0 else idx[:, :-1]
        b = idx[1:, :] if axis == 0 else idx[:, 1:]
        pa, pb = p.ravel()[a.ravel()], p.ravel()[b.ravel()]
        ea, eb = e.reshape(-1, 2)[a.ravel(), axis], e.reshape(-1, 2)[b.ravel(), axis]
        pf = 0.5 * (pa + pb) + floor
        k = pf / h**2                                  # flux coefficient per unit cell area
        flux = pf * 0.5 * (ea + eb) / h                # p e . nu / h, outward from a
        a, b = a.ravel(), b.ravel()
        rows += [a, b]
        cols += [b, a]
        vals += [k, k]
        np.add.at(diag, a, -k)
        np.add.at(diag, b, -k)
        np.add.at(rhs, a, flux)
        np.add.at(rhs, b, -flux)
    A = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n * n, n * n))
    A = (A + sp.diags(diag)).tocsr()
    pin = int(np.argmax(p))
    free = np.setdiff1d(np.arange(n * n), [pin])
    phi = np.zeros(n * n)
    phi[free] = spla.spsolve(A[free][:, free].tocsc(), rhs[free])
    phi = phi.reshape(n, n)

    grad = np.zeros((n, n, 2))
    for axis, h in ((0, hx), (1, hy)):
        df = np.diff(phi, axis=axis) / h              # face gradients, n - 1 along axis
        pad = [(0, 0), (0, 0)]
        pad[axis] = (1, 1)
        dfp = np.pad(df, pad, mode="edge")             # boundary cells: one-sided
        lo_face = dfp.take(np.arange(n), axis=axis)
        hi_face = dfp.take(np.arange(1, n + 1), axis=axis)
        grad[..., axis] = 0.5 * (lo_face + hi_face)
    sol = e - grad
    norm = lambda v: float((p * (v**2).sum(-1)).sum())  # noqa: E731
    return GridDecomposition(xs, ys, p, e, phi, grad, sol, norm(grad), norm(sol), norm(e))
