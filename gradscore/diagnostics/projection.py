"""Closed-form weighted Helmholtz-Hodge decomposition of the score error on a feature dictionary
(docs/theory.md §5-6).

With ``Phi = [grad phi_k]`` and ``G = E_p[Phi^T Phi]`` the projection of a field ``v`` onto the span is
``Phi G^-1 b`` with ``b_k = <v, grad phi_k>_p``, and ``||Pi v||^2 = b^T G^-1 b``. Three fields:

* ``s_theta`` (noise-free, docs/theory.md §6): ``b^s = E[Phi^T s_theta]``; ``grad U* = Phi G^-1 b^s`` is the
  projection of the model onto gradient fields, so ``||Pi_S e||^2 = E|s_theta|^2 - ||Pi_G s_theta||^2``.
* ``e = grad U* - grad log p = Pi_G e`` (the linear term uses ``grad U`` instead of ``s_theta``). Since
  ``<grad U*, grad phi_k> = b^s_k`` exactly, ``b^e_k = b^s_k - <grad log p, grad phi_k>``, and the
  true-score term comes without the true score from either
  - Stein: ``<grad log p, grad phi_k> = -E[lap phi_k]`` (analytic Laplacian, no ``1/sigma_t`` noise), or
  - DSM: ``<grad log p, grad phi_k> = -E[Phi_k . eps / sigma_t]`` (``E[-eps/sigma_t | x_t] = grad log p_t``),
  - ``cv`` (default): DSM minus the optimal multiple of the mean-zero control variate
    ``Phi_k . eps/sigma_t - lap phi_k`` (Gaussian integration by parts); coefficient 1 is Stein, 0 is DSM,
    so it is never worse than either up to O(1/N).

Bias control. A plug-in ``b^T G^-1 b`` is biased up by ``tr(G^-1 Cov b)``, which grows like ``c^2`` with
the size ``c`` of the model's solenoidal part (it is Monte Carlo noise of ``E[w . grad phi] = 0``); the
fit-on-one-split / evaluate-on-the-other ``J`` is biased *down* by the same amount (the honest lower
bound of docs/theory.md §6, reported as ``lower_bound``). The value returned is the U-statistic over ``n_blocks``
disjoint blocks of data points, ``sum_{j != k} b_j^T G^-1 b_k``, unbiased for ``||Pi_F v||^2``, so it does
not drift with ``c``; its standard error is the U-statistic's Hoeffding variance (``ustat_stderr``; all
noises of one ``x_0`` sit in one block). ``||Pi_F e|| <= ||Pi_G e||`` for the span ``F``: the features are
chosen rich enough (``GradientFeatures.default``) that the gap is small for smooth errors.
"""
from __future__ import annotations

import math

import torch

from ..sde import SDE
from .estimate import Estimate, jackknife, ustat_stderr
from .features import GradientFeatures
from .points import evaluate, noisy_points

__all__ = ["feature_decomposition", "LINEAR_FORMS", "default_num_points", "default_gram_points"]

LINEAR_FORMS = ("cv", "stein", "dsm")
RCOND = 1e-4


def default_num_points(dim: int) -> int:
    """Model evaluations by default: ``2^18`` for ``d <= 8``, ``2^14`` beyond (cost ``N d K`` plus the model).
    Many points matter: the variance of the linear term grows with the model's solenoidal part."""
    return 2**18 if dim <= 8 else 2**14


def default_gram_points(num_features: int) -> int:
    """Points per Gram matrix: ``max(2^13, 32 K)`` (cost ``M d K^2``; ``E[G^-1]`` is biased by ``O(K / M)``)."""
    return max(2**13, 32 * num_features)


def _pinv(G: torch.Tensor, rcond: float = RCOND) -> torch.Tensor:
    lam, V = torch.linalg.eigh(G)
    keep = lam > rcond * lam.max()
    return (V[:, keep] / lam[keep]) @ V[:, keep].T


def _ustat(b: torch.Tensor, n: torch.Tensor, Ginv: torch.Tensor) -> float:
    """``sum_{j != k} n_j n_k b_j^T Ginv b_k / sum_{j != k} n_j n_k`` for block means ``b: [B, K]``."""
    Q = b @ Ginv @ b.T
    W = n[:, None] * n[None, :]
    W = W - torch.diag(torch.diag(W))
    return float((W * Q).sum() / W.sum())


@torch.no_grad()
def feature_decomposition(score_fn, sde: SDE, x0: torch.Tensor, t: float, *, linear: str = "cv",
                          features: GradientFeatures | None = None, num_points: int | None = None,
                          gram_points: int | None = None, n_blocks: int = 10, true_score=None,
                          generator: torch.Generator | None = None, chunk: int | None = None) -> dict:
    """Gradient / solenoidal / L2 parts of the score error at one time ``t``.

    Args:
        score_fn: ``(x [B, *D], t [B]) -> [B, *D]``.
        x0: data samples ``[N, *D]`` (``N >= n_blocks``); each is noised ``ceil(num_points / N)`` times
            (antithetic orthogonal noise sets, ``points.orthogonal_noise``).
        linear: ``"cv"`` | ``"stein"`` | ``"dsm"`` (see module docstring).
        num_points: points of ``p_t`` where the model is evaluated (the linear terms ``b``; cost ``N d K``).
        gram_points: points for each Gram matrix (cost ``M d K^2``): one *independent* fresh sample for the
            ``G^-1`` of the gradient part, and the first ``M`` model points for the in-sample solenoidal residual.
        true_score: optional ``(x, t) -> [B, *D]``; then ``l2`` is the exact Monte Carlo ``E|e|^2``.
    Returns:
        ``{"gradient": Estimate, "solenoidal": Estimate, "l2": Estimate}`` (``gradient.extra`` holds
        ``lower_bound``, the held-out J, and ``cv_beta`` the mean control-variate coefficient).
    """
    if linear not in LINEAR_FORMS:
        raise ValueError(f"linear must be one of {LINEAR_FORMS}, got {linear!r}")
    N = x0.shape[0]
    if N < n_blocks:
        raise ValueError(f"x0 needs at least n_blocks={n_blocks} samples, got {N}")
    d = x0[0].numel()
    num_points = default_num_points(d) if num_points is None else int(num_points)
    n_noise = max(1, min(256, math.ceil(num_points / N)))
    xt, eps = noisy_points(sde, x0, t, n_noise, generator)
    sigma = float(sde.sigma(torch.tensor(float(t), dtype=torch.float64)))
    s = evaluate(score_fn, xt, t)
    s_true = evaluate(true_score, xt, t) if true_score is not None else None
    # draws happen on x0's device (noisy_points); the closed-form algebra (d <= 32) runs on the CPU in float64
    flat = lambda v: v.reshape(v.shape[0], -1).to("cpu", torch.float64)  # noqa: E731
    xt, eps, s = flat(xt), flat(eps), flat(s)
    if features is None:
        features = GradientFeatures.default(xt)
    K = features.num_features
    M = min(xt.shape[0], default_gram_points(K) if gram_points is None else int(gram_points))
    chunk = chunk or max(64, int(4e6 // (d * K)))

    def gram(x):
        G = torch.zeros(K, K, dtype=torch.float64)
        for c0 in range(0, x.shape[0], chunk):
            Pf = features(x[c0:c0 + chunk])[0].reshape(-1, K)
            G += Pf.T @ Pf
        return G / x.shape[0]

    # G for the gradient part from fresh points of p_t (fresh noise, no model evaluations): its noise is independent
    # of the block vectors b_j, so the cross-block statistic below is unbiased up to E[G^-1] - G^-1 = O(K / M) and
    # the O(1 / N) covariance of G with the b_j through the shared data points
    x_gram, _ = noisy_points(sde, x0, t, max(1, math.ceil(M / N)), generator)
    Ginv = _pinv(gram(flat(x_gram)[:M]))
    # noise-free solenoidal part: in-sample regression residual of s on the first M model points
    G_in = gram(xt[:M])
    bs_in = torch.zeros(K, dtype=torch.float64)
    for c0 in range(0, M, chunk):
        bs_in += torch.einsum("cdk,cd->k", features(xt[c0:min(c0 + chunk, M)])[0], s[c0:min(c0 + chunk, M)])
    bs_in /= M
    ss_in = float(s[:M].pow(2).sum(1).mean())
    sol_value = ss_in - float(bs_in @ _pinv(G_in) @ bs_in)

    # blocks by data point: row k N + i belongs to block perm_rank(i) mod n_blocks
    perm = torch.randperm(N, generator=generator, device=x0.device).cpu()
    block_of_x0 = torch.empty(N, dtype=torch.long)
    block_of_x0[perm] = torch.arange(N) % n_blocks
    block = block_of_x0.repeat(n_noise)
    sums = {k: torch.zeros(n_blocks, K, dtype=torch.float64) for k in ("bs", "dsm", "lap")}
    ss = torch.zeros(n_blocks, dtype=torch.float64)
    ee = torch.zeros(n_blocks, dtype=torch.float64)
    cov_yd = torch.zeros(K, dtype=torch.float64)
    var_d = torch.zeros(K, dtype=torch.float64)
    counts = torch.bincount(block, minlength=n_blocks).to(torch.float64)
    for c0 in range(0, xt.shape[0], chunk):
        rows = slice(c0, c0 + chunk)
        Phi, lap = features(xt[rows])                                     # [c, d, K], [c, K]
        ps = torch.einsum("cdk,cd->ck", Phi, s[rows])                     # Phi^T s
        pe = torch.einsum("cdk,cd->ck", Phi, eps[rows]) / sigma           # Phi^T eps / sigma
        bl = block[rows]
        sums["bs"].index_add_(0, bl, ps)
        sums["dsm"].index_add_(0, bl, pe)
        sums["lap"].index_add_(0, bl, lap)
        D = pe - lap                                                      # mean-zero control variate
        cov_yd += ((ps + pe) * D).sum(0)
        var_d += (D * D).sum(0)
        ss.index_add_(0, bl, s[rows].pow(2).sum(1))
        if s_true is not None:
            ee.index_add_(0, bl, (s[rows] - flat(s_true[rows])).pow(2).sum(1))
    ss, ee = ss / counts, ee / counts
    mean = {k: v / counts[:, None] for k, v in sums.items()}
    if linear == "stein":
        beta = torch.ones(K, dtype=torch.float64)
    elif linear == "dsm":
        beta = torch.zeros(K, dtype=torch.float64)
    else:
        # cov(y, D) with E[D] = 0 exactly; beta fitted on all points (O(1/N) bias)
        beta = torch.where(var_d > 0, cov_yd / var_d.clamp_min(1e-300), torch.zeros_like(var_d))
    b_e = mean["bs"] + mean["dsm"] - beta * (mean["dsm"] - mean["lap"])   # <e, grad phi_k> per block

    def stats(keep):
        w = counts[keep] / counts[keep].sum()
        grad = _ustat(b_e[keep], counts[keep], Ginv)
        # the solenoidal residual's spread over blocks: E|s|^2 and |Pi s|^2 by block (jackknife of the plug-in)
        bs = (w[:, None] * mean["bs"][keep]).sum(0)
        sol = float((w * ss[keep]).sum()) - float(bs @ Ginv @ bs)
        l2 = float((w * ee[keep]).sum()) if s_true is not None else grad + sol
        return grad, sol, l2

    (grad, _, l2), (se_g_jack, se_s, se_l) = jackknife(stats, n_blocks)
    # the U-statistic's own error (the jackknife counts its degenerate part twice); the L2 error keeps the
    # jackknife's covariance of the two parts and swaps in the gradient part's variance
    se_g = ustat_stderr(b_e @ Ginv @ b_e.T, counts[:, None] * counts[None, :])
    se_l = math.sqrt(max(se_l**2 - se_g_jack**2, 0.0) + se_g**2)
    if s_true is None:
        l2 = grad + sol_value

    # honest held-out J (docs/theory.md §6): fit on half the blocks, evaluate on the other half, both ways
    half = torch.arange(n_blocks) < n_blocks // 2
    G_eval = torch.linalg.pinv(Ginv, hermitian=True)
    J = []
    for fit in (half, ~half):
        wf, we = counts[fit] / counts[fit].sum(), counts[~fit] / counts[~fit].sum()
        a = Ginv @ (wf[:, None] * b_e[fit]).sum(0)
        be = (we[:, None] * b_e[~fit]).sum(0)
        J.append(float(2 * be @ a - a @ G_eval @ a))
    common = {"t": float(t), "num_points": int(xt.shape[0]), "gram_points": M, "num_features": K, "linear": linear}
    return {
        "gradient": Estimate(grad, se_g, {**common, "lower_bound": sum(J) / 2, "cv_beta": float(beta.mean())}),
        "solenoidal": Estimate(sol_value, se_s, dict(common)),
        "l2": Estimate(l2, se_l, {**common, "exact": s_true is not None}),
    }
