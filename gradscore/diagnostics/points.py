"""Points of ``p_t`` drawn from data: ``x_t = alpha_t x_0 + sigma_t eps`` with several noises per ``x_0``."""
from __future__ import annotations

import torch

from ..sde import SDE

__all__ = ["as_time", "time_grid", "noisy_points", "evaluate", "repeat_cond", "select_cond", "check_cond",
           "check_generator"]


def as_time(t) -> float:
    """A single time from a float or a 0-dim / one-element tensor."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a single time here, got a tensor of shape {tuple(t.shape)}")
        return float(t.reshape(()))
    return float(t)


def time_grid(t):
    """``None`` for a single time (float or 0-dim tensor), else the list of floats of a grid."""
    if isinstance(t, torch.Tensor):
        return None if t.dim() == 0 else [float(v) for v in t.flatten()]
    if isinstance(t, (list, tuple)):
        return [float(v) for v in t]
    return None


def orthogonal_noise(n: int, n_noise: int, d: int, generator: torch.Generator | None = None,
                     dtype=torch.float32) -> torch.Tensor:
    """``[n_noise, n, d]`` standard normal noises, ``n_noise`` per point, drawn in antithetic orthogonal sets.

    Each set is ``+- r Q e_j`` (``j < k``, ``k = min(d, n_noise // 2)``) with ``Q`` a Haar-random rotation and
    one radius ``r`` per set; the radii of the sets of one point are stratified over the ``chi_d``
    distribution (``r_m = F^-1((pi_m + u) / n_sets)``, ``pi`` a random permutation, ``u ~ U(0, 1)``). Every
    single noise is exactly ``N(0, I)`` (uniform direction, ``chi_d`` radius, independent), so every average
    stays unbiased; within a set the noises are negatively correlated (odd parts of the integrand cancel,
    quadratic forms average to ``r^2 tr / d``), which removes most of the within-``x_0`` Monte Carlo variance
    of smooth integrands. A remainder (``n_noise`` odd) is plain ``randn``.
    """
    from scipy.stats import chi

    k = max(1, min(d, n_noise // 2))
    sets, rest = divmod(n_noise, 2 * k)
    out = []
    dev = generator.device if generator is not None else torch.device("cpu")
    if sets:
        perm = torch.argsort(torch.rand(n, sets, generator=generator, device=dev), dim=1).to(torch.float64)
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64, device=dev)
        q = ((perm + u) / sets).clamp(1e-12, 1 - 1e-12)
        radii = torch.from_numpy(chi.ppf(q.cpu().numpy(), d)).to(dev)       # [n, sets] (quantiles by scipy)
    for m in range(sets):
        A = torch.randn(n, d, k, generator=generator, dtype=torch.float64, device=dev)
        Q, R = torch.linalg.qr(A)                                           # [n, d, k], Haar columns
        Q = Q * torch.sign(torch.diagonal(R, dim1=1, dim2=2)).unsqueeze(1)
        pts = (Q * radii[:, m, None, None]).permute(2, 0, 1)                # [k, n, d]
        out += [pts, -pts]
    if rest:
        out.append(torch.randn(rest, n, d, generator=generator, dtype=torch.float64, device=dev))
    return torch.cat(out).to(dtype)


def noisy_points(sde: SDE, x0: torch.Tensor, t: float, n_noise: int, generator: torch.Generator | None = None,
                 design: str = "orthogonal"):
    """``(x_t, eps)`` of shape ``[n_noise * N, *D]`` (row ``k N + i`` noises ``x0[i]``), in x0's float dtype (>= fp32).

    ``design="orthogonal"``: the noises of one ``x_0`` come in antithetic orthogonal sets
    (``orthogonal_noise``; each noise exactly ``N(0, I)``); ``"random"``: independent ``randn``.
    Draws use ``generator`` (on x0's device: a generator on another device is an error).
    """
    check_generator(generator, x0)
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor [N, *D], got {x0.dtype}")
    if design not in ("orthogonal", "random"):
        raise ValueError(f"design must be 'orthogonal' or 'random', got {design!r}")
    if x0.dtype in (torch.float16, torch.bfloat16):
        x0 = x0.float()
    rep = x0.repeat(n_noise, *([1] * (x0.dim() - 1)))
    tt = torch.full((rep.shape[0],), float(t), dtype=rep.dtype, device=rep.device)
    noise = None
    if design == "orthogonal" and n_noise >= 2:
        N, D = x0.shape[0], x0[0].numel()
        noise = orthogonal_noise(N, n_noise, D, generator, rep.dtype).reshape(rep.shape).to(rep.device)
    return sde.perturb(rep, tt, noise=noise, generator=generator)


def check_generator(generator: torch.Generator | None, x: torch.Tensor) -> None:
    """Raise if ``generator`` lives on another device type than ``x`` (draws must happen where the data is)."""
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but the data x0 is on {x.device}: pass "
                         f"torch.Generator(device={str(x.device)!r}) so every draw happens on the data's device")


def repeat_cond(cond: dict, n_noise: int) -> dict:
    """Per-sample conditioning tensors ``[N, ...]`` repeated for the points ``[n_noise * N, ...]`` of
    ``noisy_points`` (row ``k N + i`` belongs to ``x0[i]``)."""
    return {k: v.repeat(n_noise, *([1] * (v.dim() - 1))) for k, v in cond.items()}


def select_cond(cond: dict, idx: torch.Tensor) -> dict:
    """The conditioning of the data points ``idx``."""
    return {k: v[idx.to(v.device)] for k, v in cond.items()}


def check_cond(cond: dict, n: int) -> None:
    for k, v in cond.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"conditioning {k!r} must be a per-sample tensor [N={n}, ...] aligned with x0, "
                             f"got {shape}")


@torch.no_grad()
def evaluate(score_fn, x: torch.Tensor, t: float, chunk: int = 4096, **cond) -> torch.Tensor:
    """``score_fn(x, t, **cond)`` over ``x: [M, *D]`` in chunks (``cond`` per-sample ``[M, ...]``), no autograd
    graph kept (energy models still differentiate internally). Returns ``[M, *D]``."""
    outs = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        tb = torch.full((xb.shape[0],), float(t), dtype=xb.dtype, device=xb.device)
        out = score_fn(xb, tb, **{k: v[i:i + chunk] for k, v in cond.items()})
        if out.shape != xb.shape:
            raise ValueError(f"score_fn returned shape {tuple(out.shape)}, expected x's shape {tuple(xb.shape)}")
        outs.append(out.detach())
    return torch.cat(outs)
