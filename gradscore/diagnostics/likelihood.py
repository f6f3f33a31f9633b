"""Model likelihood by the probability-flow ODE, and bits per dimension (docs/theory.md §9.1-9.2).

A score model ``s_theta`` defines densities ``q_t`` through the probability-flow ODE
``dx/dt = u(x, t) = f(x, t) - g(t)^2 s_theta(x, t) / 2`` started from the prior ``pi`` at ``T``. Along a
trajectory ``d/dt log q_t(x_t) = -div u``, so integrating the augmented state ``(x_t, int div u)`` from
``t0`` to ``T`` gives

    log q_t0(x) = log pi(x_T) + int_t0^T div_x u(x_t, t) dt,      div u = d f'(t) - g^2 div s_theta / 2.

``div s_theta`` is exact (one backward pass per coordinate) for small ``d``, else Hutchinson's unbiased
``E_z[z^T (ds/dx) z]`` with probes ``z`` fixed along the trajectory. The ODE runs in scipy's adaptive
RK45 (``solve_ivp``). ``bits_per_dim`` adds uniform dequantisation on the data's grid of spacing
``Delta = 2 / (levels - 1)`` and returns ``-(log q(x + Delta U) + d log Delta) / (d log 2)``, an upper
bound on the discrete model's bits (docs/theory.md §9.2).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..sde import SDE, broadcast_to

__all__ = ["log_likelihood", "bits_per_dim", "EXACT_DIVERGENCE_MAX_DIM"]

EXACT_DIVERGENCE_MAX_DIM = 16      # method=None: the exact divergence up to this many dimensions, Hutchinson above
METHODS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _divergence_exact(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i d s_i / d x_i`` per sample, ``[B]``: one backward pass per coordinate of ``x: [B, *D]``."""
    flat = s.reshape(s.shape[0], -1)
    div = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        div = div + g.reshape(g.shape[0], -1)[:, i]
    return div


def _divergence_hutchinson(s: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``mean_k z_k^T (ds/dx) z_k`` per sample, ``[B]``, for ``probes: [K, B, *D]`` (one backward pass each)."""
    div = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    for z in probes:
        (g,) = torch.autograd.grad((s * z).sum(), x, retain_graph=True)
        div = div + (g * z).reshape(g.shape[0], -1).sum(1)
    return div / probes.shape[0]


def _draw_probes(kind: str, shape: tuple[int, ...], like: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype)
        return 2 * z - 1
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _solve_chunk(score_fn, sde: SDE, x: torch.Tensor, cond: dict, t0: float, method: str, probes, rtol: float,
                 atol: float, offset: int, bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(x_T [B, *D], log pi(x_T) [B], int div u dt [B], number of score evaluations)`` for one chunk
    ``x: [B, *D]``."""
    B, shape, device, dtype = x.shape[0], x.shape[1:], x.device, x.dtype
    n = x[0].numel()

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y[: B * n]).to(device=device, dtype=dtype).reshape(B, *shape)
        tt = torch.full((B,), t, device=device, dtype=dtype)
        with torch.enable_grad():
            xt.requires_grad_(True)
            s = score_fn(xt, tt, **cond)
            if not isinstance(s, torch.Tensor) or s.shape != xt.shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"log_likelihood: score_fn returned {got}, expected a tensor shaped like x "
                                 f"{tuple(xt.shape)}")
            s = s.to(dtype)
            _check_finite(s.detach(), "the score", t, offset)
            if not s.requires_grad:            # a score that does not depend on x (or on anything): div s = 0
                div_s = torch.zeros(B, device=device, dtype=dtype)
            elif method == "exact":
                div_s = _divergence_exact(s, xt)
            else:
                div_s = _divergence_hutchinson(s, xt, probes)
        s, div_s, xt = s.detach(), div_s.detach(), xt.detach()
        _check_finite(div_s[:, None], "the divergence of the score", t, offset)
        g2 = sde.g2(tt).to(dtype)
        u = sde.drift(xt, tt) - 0.5 * broadcast_to(g2, xt) * s
        div_u = n * sde.drift_coef(tt).to(dtype) - 0.5 * g2 * div_s
        if bar is not None:
            bar.update(max(0.0, t - bar.n))
        return torch.cat([u.reshape(-1), div_u]).to(torch.float64).cpu().numpy()

    y0 = np.concatenate([x.detach().reshape(-1).to(torch.float64).cpu().numpy(), np.zeros(B)])
    sol = solve_ivp(rhs, (t0, sde.T), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"log_likelihood: the probability-flow ODE solver failed for samples "
                           f"{offset}..{offset + B - 1} ({sol.message})")
    yT = torch.from_numpy(sol.y[:, -1]).to(device)
    xT = yT[: B * n].reshape(B, *shape)
    return xT, sde.prior_log_prob(xT).to(torch.float64), yT[B * n:], int(sol.nfev)


def _check_finite(v: torch.Tensor, what: str, t: float, offset: int) -> None:
    bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
    if bad.any():
        idx = (torch.nonzero(bad).flatten() + offset).tolist()
        raise FloatingPointError(f"log_likelihood: {what} is non-finite at t={t:.6g} for samples {_fmt_ids(idx)} "
                                 f"(indices into x)")


def _fmt_ids(idx: list[int], n: int = 20) -> str:
    return str(idx) if len(idx) <= n else f"{idx[:n]} and {len(idx) - n} more"


def log_likelihood(score_fn: Callable[..., torch.Tensor], sde: SDE, x: torch.Tensor, *, t0: float | None = None,
                   method: str | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                   generator: torch.Generator | None = None, n_probes: int = 1, probe: str = "rademacher",
                   chunk: int | None = None, progress: bool = False, return_stats: bool = False,
                   **cond: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """``log q_t0(x)`` in nats under the model's probability-flow ODE (docs/theory.md §9.1).

    Args:
        score_fn: ``(x [B, *D], t [B], **cond) -> [B, *D]``; called under grad mode with ``x`` requiring grad
            (an ``EnergyScore`` then keeps the graph of its input gradient, which the divergence needs).
        sde: the forward process; its prior ``pi = N(0, prior_std^2 I)`` closes the integral at ``T``.
        x: points ``[B, *D]``. The score is evaluated in ``x``'s dtype and on its device (pass float64 ``x`` to a
            float64 model for a float64 computation); the ODE state is float64 (scipy), the log-densities returned
            are float64 on ``x``'s device.
        t0: the starting time (default ``sde.t_min``): the result is the model's density ``q_t0``.
        method: ``"exact"`` (``d`` backward passes per evaluation), ``"hutchinson"`` (``n_probes`` backward passes;
            unbiased for ``log q``), or ``None``: exact when ``d <= 16``, else Hutchinson.
        rtol, atol: tolerances of the adaptive RK45 solver (over ``x`` and the log-density increment).
        generator: draws the Hutchinson probes (on ``x``'s device), ``[n_probes, B, *D]``, once per chunk and fixed
            along the trajectory.
        n_probes: probes averaged per evaluation (Hutchinson).
        probe: ``"rademacher"`` (``+-1``; lower variance) or ``"gaussian"``.
        chunk: solve the batch in chunks of this many samples (one adaptive solve each); default the whole batch.
        progress: a tqdm bar over time per chunk.
        return_stats: also return ``{"nfe": score evaluations (all chunks), "prior_logp": log pi(x_T) [B],
            "delta_logp": int div u dt [B], "x_T": the ODE's end points [B, *D] (float64)}``.
        **cond: per-sample tensors aligned with ``x`` (leading dimension ``B``), passed to ``score_fn`` as they are
            (sliced with ``x`` when chunking).
    Returns:
        ``log q_t0(x)``: ``[B]`` float64 (with ``return_stats``: ``(logq, stats)``).
    Raises:
        FloatingPointError: the score, its divergence or the result is non-finite; the message names the samples.
        ValueError: a bad argument (method, probe, n_probes, t0, a ``cond`` tensor not aligned with ``x``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"log_likelihood: x must be a floating tensor [B, *D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                         f"{' of dtype ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    B, d = x.shape[0], x[0].numel()
    if method is None:
        method = "exact" if d <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    if method not in METHODS:
        raise ValueError(f"log_likelihood: method must be one of {METHODS} or None, got {method!r}")
    if probe not in PROBES:
        raise ValueError(f"log_likelihood: probe must be one of {PROBES}, got {probe!r}")
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise ValueError(f"log_likelihood: n_probes must be an integer >= 1, got {n_probes!r}")
    t0 = float(sde.t_min if t0 is None else t0)
    if not 0 <= t0 < sde.T:
        raise ValueError(f"log_likelihood: t0 must be in [0, T={sde.T}), got {t0}")
    for k, v in cond.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != B:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"log_likelihood: cond {k!r} must be a per-sample tensor with leading dimension "
                             f"B={B} (aligned with x), got {got}")
    chunk = B if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"log_likelihood: chunk must be >= 1, got {chunk}")

    ends, prior, delta, nfe = [], [], [], 0
    for lo in range(0, B, chunk):
        xc = x[lo: lo + chunk]
        cc = {k: v[lo: lo + chunk] for k, v in cond.items()}
        probes = (_draw_probes(probe, (n_probes, *xc.shape), xc, generator) if method == "hutchinson" else None)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sde.T, initial=t0, desc=f"log-likelihood {lo}..{lo + xc.shape[0] - 1}",
                       bar_format="{l_bar}{bar}| t={n:.3f}/{total:.3f} [{elapsed}]")
        try:
            xT, p, dl, n = _solve_chunk(score_fn, sde, xc, cc, t0, method, probes, rtol, atol, lo, bar)
        finally:
            if bar is not None:
                bar.close()
        ends.append(xT)
        prior.append(p)
        delta.append(dl)
        nfe += n
    prior_logp, delta_logp = torch.cat(prior), torch.cat(delta)
    logq = prior_logp + delta_logp
    bad = ~torch.isfinite(logq)
    if bad.any():
        raise FloatingPointError(f"log_likelihood: non-finite log-likelihood for samples "
                                 f"{_fmt_ids(torch.nonzero(bad).flatten().tolist())} (indices into x)")
    if return_stats:
        return logq, {"nfe": nfe, "prior_logp": prior_logp, "delta_logp": delta_logp, "x_T": torch.cat(ends)}
    return logq


def _grid_values(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The data scaled to ``[-1, 1]`` as ``2 k / (levels - 1) - 1``, checked to lie on that grid."""
    if not x.is_floating_point():
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"bits_per_dim: x must hold integer levels or values scaled to [-1, 1], "
                             f"got dtype {x.dtype}")
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > levels - 1:
            raise ValueError(f"bits_per_dim: integer x must hold levels 0..{levels - 1} (levels={levels}), "
                             f"got values in [{lo}, {hi}]")
        return x.to(torch.get_default_dtype()) * (2.0 / (levels - 1)) - 1.0
    if not torch.isfinite(x).all():
        raise ValueError("bits_per_dim: x has non-finite values")
    lo, hi = float(x.min()), float(x.max())
    spacing = 2.0 / (levels - 1)
    tol = 1e-3 * spacing
    if lo < -1 - tol or hi > 1 + tol:
        raise ValueError(f"bits_per_dim: floating x must be scaled to [-1, 1] (k / {(levels - 1) / 2:g} - 1 for "
                         f"k = 0..{levels - 1}), got values in [{lo:.4g}, {hi:.4g}]")
    k = (x.double() + 1) / spacing
    off = (k - k.round()).abs().max()
    if off > 1e-3:
        raise ValueError(f"bits_per_dim: x is not on the grid of levels={levels} values in [-1, 1] (spacing "
                         f"{spacing:.6g}; largest distance {float(off):.3g} spacings): pass the number of quantisation "
                         f"levels of the data (8-bit: 256; scikit-learn digits: 17)")
    return x


def bits_per_dim(score_fn: Callable[..., torch.Tensor], sde: SDE, x: torch.Tensor, *, levels: int = 256,
                 dequantise: str = "uniform", t0: float | None = None, method: str | None = None, rtol: float = 1e-5,
                 atol: float = 1e-5, generator: torch.Generator | None = None, n_probes: int = 1,
                 probe: str = "rademacher", chunk: int | None = None, progress: bool = False,
                 return_stats: bool = False, **cond: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Bits per dimension of quantised data under the model, with uniform dequantisation (docs/theory.md §9.2).

    ``x`` holds ``levels`` quantisation levels either as integers ``k`` (e.g. ``uint8`` images, converted to the
    default dtype) or scaled to ``[-1, 1]`` as ``x = 2 k / (levels - 1) - 1`` (8-bit: ``k / 127.5 - 1``), the
    units the model was trained in. The dequantised point is ``y = x + Delta U``, ``U ~ U([0, 1)^d)``,
    ``Delta = 2 / (levels - 1)`` (the grid spacing), and

        bpd = -(log q_t0(y) + d log Delta) / (d log 2)        (8-bit: -(log q(y) - d log 127.5) / (d log 2)),

    an upper bound on ``-log_2 P(k) / d`` of the discrete model (Jensen), unbiased over ``U`` for its average.

    Args:
        x: ``[B, *D]`` integer levels or floats on the grid in ``[-1, 1]``.
        levels: the number of quantisation levels (8-bit: 256; scikit-learn's digits: 17).
        dequantise: ``"uniform"`` (the only scheme).
        generator: draws first ``U`` (``torch.rand(x.shape)`` on ``x``'s device, in ``y``'s dtype), then the probes.
        Others: as ``log_likelihood``.
    Returns:
        ``[B]`` float64 bits per dimension (with ``return_stats``: ``(bpd, stats)``, stats as ``log_likelihood``'s plus
        ``"dequantised"``: ``y``).
    Raises:
        ValueError: ``x`` out of range, off the grid of ``levels`` values, or a bad ``levels`` / ``dequantise``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"bits_per_dim: x must be a tensor [B, *D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"bits_per_dim: levels must be an integer >= 2, got {levels!r}")
    if dequantise != "uniform":
        raise ValueError(f"bits_per_dim: dequantise must be 'uniform', got {dequantise!r}")
    xs = _grid_values(x, levels)
    delta = 2.0 / (levels - 1)
    y = xs + delta * torch.rand(xs.shape, generator=generator, device=xs.device, dtype=xs.dtype)
    logq, stats = log_likelihood(score_fn, sde, y, t0=t0, method=method, rtol=rtol, atol=atol, generator=generator,
                                 n_probes=n_probes, probe=probe, chunk=chunk, progress=progress, return_stats=True,
                                 **cond)
    d = xs[0].numel()
    bpd = -(logq + d * math.log(delta)) / (d * math.log(2))
    if return_stats:
        return bpd, {**stats, "dequantised": y}
    return bpd
