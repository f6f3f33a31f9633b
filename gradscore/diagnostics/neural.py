"""Gradient and solenoidal parts of the score error at any dimension, images included (docs/theory.md §6).

Two regressions, each fitted on one part of the data and scored on held-out data:

1. **Noise-free projection of the model onto gradient fields** (solenoidal part). With the model's values
   ``s`` only (no noise, no true score), fit ``g = beta grad U_s + a + grad U`` to ``s``: ``grad U_s`` the
   path-integral potential (``path.py``: exact for every conservative model), ``a`` the closed-form affine
   gradient (a Lyapunov solve, ``affine.py``) and ``U`` a scalar network fitted to what is left, with early
   stopping on a validation split. ``||Pi_S e||^2 = ||Pi_S s||^2`` is estimated by the held-out ``E|s - g|^2``.
2. **The gradient part** ``||Pi_G e||^2 = ||Pi_aff e||^2 + ||Pi_G e - Pi_aff e||^2``. The affine part is closed
   form without noise (integration by parts: ``E[grad log p (x - m)^T] = -I``), a U-statistic over blocks of
   held-out data on the model's own values. The rest, ``~ g - grad log p_t - Pi_aff e``, is a gradient field, so
   ``sup_psi E[2 v . grad psi - |grad psi|^2] = ||v||^2`` holds with equality: a scalar critic is fitted in the
   Stein form ``E[2 ((g - a') . grad psi + lap psi) - |grad psi|^2]`` (Hutchinson Laplacian), which has no
   ``1 / sigma_t`` noise at small times. Because the model's solenoidal part was removed in step 1, its size does
   not enter the noise of the critic.

The held-out values are unbiased for the fitted fields, so the gradient value is a lower bound of
``||g - grad log p||^2`` and the solenoidal value an upper bound of ``||Pi_S s||^2``; both are grouped by data
point for their standard errors.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from ..critic import Critic, critic_objective
from ..nets import TimeMLP
from ..sde import SDE
from .affine import AffineGradient, Moments, affine_norm_ustat
from .estimate import Estimate
from .path import path_potential_gradient
from .points import check_cond, check_generator, evaluate, noisy_points, repeat_cond, select_cond

__all__ = ["ConvCritic", "FlatMLP", "default_critic", "neural_decomposition"]

MLP_MAX_DIM = 1024


class ConvCritic(nn.Module):
    """``(x [B, C, H, W], t [B]) -> [B]``: three 3x3 convolutions (SiLU, the last two strided), a global
    mean and a linear head. ``t`` is ignored (one critic is fitted per time)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean((2, 3)))[:, 0]


class FlatMLP(nn.Module):
    """``(x [B, *D], t [B]) -> [B]``: a ``TimeMLP`` on the flattened input (one scalar per sample)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.mlp = TimeMLP(dim, hidden=hidden, depth=depth, out_dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.reshape(x.shape[0], -1), t)


def default_critic(example: torch.Tensor, sde: SDE, seed: int = 0) -> Critic:
    """A fresh scalar critic for data shaped like ``example: [B, *D]``: an MLP on the flattened input up to
    ``d = 1024``, a small conv net for larger images ``[B, C, H, W]``; on ``example``'s device."""
    d = example[0].numel()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if d <= MLP_MAX_DIM:
            backbone = FlatMLP(d)
        elif example.dim() == 4:
            backbone = ConvCritic(example.shape[1])
        else:
            raise ValueError(f"no default critic for data of shape [B, *D] = {tuple(example.shape)}; expected "
                             f"d <= {MLP_MAX_DIM} or images [B, C, H, W] (pass critic=...)")
    return Critic(backbone, sde, time_input="t").to(example.device)


def _stein_terms(critic: Critic, x: torch.Tensor, t: float, generator: torch.Generator | None,
                 create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad psi [n, *D], lap psi [n])`` at ``x``; the Laplacian is Hutchinson's ``z^T (Hess psi) z`` with one
    Rademacher probe per point (unbiased). ``create_graph``: keep the graph to train through both."""
    z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        g = critic(xg, torch.full((x.shape[0],), t, device=x.device))
        (hz,) = torch.autograd.grad((g * z).sum(), xg, create_graph=create_graph)
    lap = (hz * z).flatten(1).sum(1)
    return (g, lap) if create_graph else (g.detach(), lap.detach())


def _field(critic: Critic, x: torch.Tensor, t: float, generator: torch.Generator | None = None, laplacian=False,
           chunk: int = 4096):
    """``grad psi`` of a fitted critic at ``x: [n, *D]`` as ``[n, d]`` float64 (no graph), and with ``laplacian``
    also its Hutchinson Laplacian ``[n]``."""
    grads, laps = [], []
    for c0 in range(0, x.shape[0], chunk):
        xb = x[c0:c0 + chunk]
        if laplacian:
            g, lap = _stein_terms(critic, xb, t, generator, create_graph=False)
            laps.append(lap.double())
        else:
            with torch.no_grad():
                g = critic(xb, torch.full((xb.shape[0],), t, device=xb.device))
        grads.append(g.flatten(1).double() * getattr(critic, "output_scale", 1.0))
    return (torch.cat(grads), torch.cat(laps)) if laplacian else torch.cat(grads)


def _grad_field(critic: Critic, x: torch.Tensor, t: float) -> torch.Tensor:
    return _field(critic, x, t)


def _fit(critic: Critic, x: torch.Tensor, target: torch.Tensor, val: tuple, t: float, sigma: float, *, steps: int,
         batch_size: int, lr: float, generator: torch.Generator | None, stein: bool = False, eval_every: int = 50,
         patience: int = 3) -> Critic | None:
    """Maximise ``E[2 target . grad psi - |grad psi|^2]`` (``critic_objective``; with ``stein``, plus
    ``2 lap psi``: the Stein form of ``-E[grad log p . grad psi]``) over the critic on ``(x, target)``; keep the state
    with the best validation objective on ``val = (x_val, target_val)``, stopping after ``patience`` validations
    without improvement. Returns ``None`` when no state beats ``psi = 0`` (objective 0) on the validation split.
    ``x: [n, *D]``, ``target: [n, d]``."""
    x_val, target_val = val
    shape = x.shape[1:]
    target, target_val = target.float().reshape(-1, *shape), target_val.float().reshape(-1, *shape)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state, since = -math.inf, None, 0     # patience counts from the best value seen, even below 0

    def objective(tgt, xb, create_graph):
        if stein:
            g, lap = _stein_terms(critic, xb, t, generator, create_graph)
            return critic_objective(tgt, g) + 2 * lap
        if create_graph:
            return critic_objective(tgt, critic(xb, torch.full((xb.shape[0],), t, device=xb.device)))
        return critic_objective(tgt, _grad_field(critic, xb, t).float().reshape(xb.shape))

    def validate():
        vals = [objective(target_val[c0:c0 + 4096], x_val[c0:c0 + 4096], False).double()
                for c0 in range(0, x_val.shape[0], 4096)]
        return float(torch.cat(vals).mean())

    critic.train()
    with torch.autocast(x.device.type, enabled=False):
        for step in range(1, steps + 1):
            i = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=x.device)
            with torch.enable_grad():
                # scaled by sigma_t^2 (targets are of order 1 / sigma_t): the same optimum, an O(1) loss at every t
                loss = -sigma**2 * objective(target[i], x[i], True).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            if step % eval_every == 0 or step == steps:
                critic.eval()
                v = validate()
                critic.train()
                if v > best:
                    best, best_state, since = v, copy.deepcopy(critic.state_dict()), 0
                else:
                    since += 1
                    if since >= patience:
                        break
    critic.eval()
    if best_state is None or best <= 0:
        return None
    critic.load_state_dict(best_state)
    return critic


def _per_x0(values: torch.Tensor, n_noise: int, n: int) -> torch.Tensor:
    """Per-point values ``[n_noise * n]`` (row ``k n + i`` belongs to data point ``i``) averaged per data point."""
    return values.reshape(n_noise, n).mean(0)


def neural_decomposition(score_fn, sde: SDE, x0: torch.Tensor, t: float, *, num_points: int | None = None,
                         steps: int = 500, batch_size: int = 512, lr: float = 2e-3, path_nodes: int | None = None,
                         critic: Critic | None = None, potential: Critic | None = None, true_score=None,
                         generator: torch.Generator | None = None, seed: int = 0, chunk: int = 2048,
                         gram_points: int | None = None, n_blocks: int = 10, solenoidal_points: int | None = None,
                         **cond) -> dict:
    """Gradient / solenoidal / L2 parts of the score error at one time ``t`` (see the module docstring).

    Args:
        score_fn: ``(x [B, *D], t [B], **cond) -> [B, *D]``; differentiable in ``x`` unless ``path_nodes=0``.
        x0: data ``[N, *D]`` (``N >= 8``), split by data point: 40% fit, 20% validation, 40% held out.
        num_points: points of ``p_t`` in all (default ``2^14``); ``ceil(num_points / N)`` noises per data point.
        steps, batch_size, lr: Adam (cosine decay) for each of the two networks.
        path_nodes: Gauss-Legendre nodes of the path potential (0: leave it out; default 24 up to d = 8, where
            sharp low-dimensional densities at small t need them, 8 above: each node is one model evaluation and
            one vector-Jacobian product per point).
        critic, potential: the scalar networks of steps 2 and 1 (``gradscore.Critic``; default ``default_critic``).
        true_score: optional exact score ``(x, t, **cond) -> [B, *D]``: then ``l2`` is exact Monte Carlo.
        gram_points: points of ``p_t`` (fresh noise on the fit and validation data points) for the covariance
            of the affine part (default ``max(2^15, 16 d)``); n_blocks: blocks of held-out data points of its
            U-statistic.
        solenoidal_points: of the ``num_points``, how many step 1 (the projection of ``s``, hence the solenoidal
            part) uses: the first ``ceil(solenoidal_points / N)`` noises of every data point (default: all). Step 1
            costs ``1 + 3 path_nodes`` model evaluations a point where step 2 costs one, and its value is far less
            noisy than the gradient part's, so fewer points there buy the same error bars for less.
        generator: every draw (split, noise, batches) uses it; it must be on ``x0``'s device.
        cond: per-sample conditioning tensors ``[N, ...]`` passed to ``score_fn``.
    Returns:
        ``{"gradient", "solenoidal", "l2"}`` ``Estimate`` values (standard errors over held-out data points).
    """
    check_generator(generator, x0)
    check_cond(cond, x0.shape[0])
    N = x0.shape[0]
    if N < 8:
        raise ValueError(f"x0 needs at least 8 data points (fit / validation / held-out splits), got {N}")
    t = float(t)
    dev = x0.device
    d_flat = x0[0].numel()
    if 0.6 * N < 4 * d_flat:
        # the affine part's covariance comes from the fit / validation data points (60% of N): with fewer than a few
        # times d of them its inverse is far from unbiased at small t (measured on the digits UNet, d = 64, t = 0.001:
        # N = 64 read -4.6e7 +- 1.9e7 where N = 1024 reads 1.57e5 +- 1.4e3)
        warnings.warn(f"neural_decomposition at t={t:g}: x0 has {N} data points for d = {d_flat}; the affine part "
                      f"needs at least ~{math.ceil(4 * d_flat / 0.6)} (0.6 N >= 4 d), or its value can be far off, "
                      "most at small t", stacklevel=2)
    if path_nodes is None:
        path_nodes = 24 if d_flat <= 8 else 8
    num_points = 2**14 if num_points is None else int(num_points)
    n_noise = max(1, math.ceil(num_points / N))
    if solenoidal_points is not None and int(solenoidal_points) < 1:
        raise ValueError(f"solenoidal_points must be a positive number of points (or None: all), got "
                         f"{solenoidal_points}")
    n_sol = n_noise if solenoidal_points is None else min(n_noise, math.ceil(int(solenoidal_points) / N))
    sigma = float(sde.sigma(torch.tensor(t, dtype=torch.float64)))
    alpha = float(sde.alpha(torch.tensor(t, dtype=torch.float64)))
    center = alpha * x0.float().mean(0)
    perm = torch.randperm(N, generator=generator, device=dev)
    n_fit, n_val = int(0.4 * N), int(0.2 * N)
    splits = {"fit": perm[:n_fit], "val": perm[n_fit:n_fit + n_val], "held": perm[n_fit + n_val:]}

    pts = {}
    for name, idx in splits.items():
        xt, _ = noisy_points(sde, x0[idx], t, n_noise, generator)
        c = repeat_cond(select_cond(cond, idx), n_noise)
        s = evaluate(score_fn, xt, t, chunk, **c)
        h = None
        rows = n_sol * idx.numel()                  # step 1's points: the first n_sol noises of every data point
        if path_nodes:
            hs = []
            for c0 in range(0, rows, chunk):
                xb = xt[c0:min(c0 + chunk, rows)]
                tb = torch.full((xb.shape[0],), t, dtype=xb.dtype, device=dev)
                hs.append(path_potential_gradient(score_fn, xb, tb, center, path_nodes,
                                                  **{k: v[c0:c0 + xb.shape[0]] for k, v in c.items()}))
            h = torch.cat(hs).flatten(1).double()
        true = evaluate(true_score, xt, t, chunk, **c).flatten(1).double() if true_score is not None else None
        pts[name] = dict(x=xt.float(), xf=xt.flatten(1).double(), s=s.flatten(1).double(),
                         h=h, true=true, n=idx.numel())
    # step 1 on its points (a view when n_sol = n_noise); step 2 below uses all of pts
    sub = {name: {**{k: p[k][:n_sol * p["n"]] for k in ("x", "xf", "s")}, "h": p["h"], "n": p["n"]}
           for name, p in pts.items()}
    A = {k: torch.cat([sub["fit"][k], sub["val"][k]]) for k in ("xf", "s")}
    mom = Moments.of(A["xf"])

    # --- 1. noise-free projection of s onto gradient fields: beta grad U_s + affine + grad U (fitted on fit/val)
    a_s = AffineGradient.project(A["xf"], A["s"], mom)
    beta, a = 0.0, a_s
    if path_nodes:
        hA = torch.cat([sub["fit"]["h"], sub["val"]["h"]])
        a_h = AffineGradient.project(A["xf"], hA, mom)
        rs, rh = A["s"] - a_s(A["xf"]), hA - a_h(A["xf"])
        denom = float(rh.pow(2).sum())
        # grad U_s adds nothing beyond the affine fit when it is affine itself (then rh is rounding noise)
        beta = float((rs * rh).sum()) / denom if denom > 1e-10 * float(hA.pow(2).sum()) else 0.0
        a = a_s - a_h.scale(beta)

    def projected(p):                                          # beta grad U_s + a, before the network
        return a(p["xf"]) + (beta * p["h"] if path_nodes else 0.0)

    for p in sub.values():
        p["rho"] = p["s"] - projected(p)
    left = float(sub["fit"]["rho"].pow(2).sum(1).mean()) / max(float(sub["fit"]["s"].pow(2).sum(1).mean()), 1e-300)
    if left < 1e-12:                # beta grad U_s + a already is the model (to rounding): nothing left to fit
        potential = None
    else:
        potential = potential if potential is not None else default_critic(x0[:2], sde, seed)
        # the target is brought to the critic's natural size ~ 1 / sigma_t (its psi = psi~ / sigma_t), whatever the
        # size of what is left: a sharp score at small t is far larger, a near-gradient model's rest far smaller
        scale = math.sqrt(left * float(sub["fit"]["s"].pow(2).sum(1).mean())) * sigma
        potential = _fit(potential, sub["fit"]["x"], sub["fit"]["rho"] / scale,
                         (sub["val"]["x"], sub["val"]["rho"] / scale), t, sigma, steps=steps, batch_size=batch_size,
                         lr=lr, generator=generator)
        if potential is not None:
            potential.output_scale = scale
    held_s = sub["held"]
    g_held = projected(held_s) + (_grad_field(potential, held_s["x"], t) if potential is not None else 0.0)
    sol_pt = (held_s["s"] - g_held).pow(2).sum(1)
    held = pts["held"]

    # --- 2. gradient part ||g - grad log p||^2 = affine part + the rest. The affine part is closed form and
    # noise-free (integration by parts: E[(g - grad log p)(x - m)^T] = E[g (x - m)^T] + I), as a U-statistic over
    # blocks of held-out data points with C from fresh points of p_t (no model evaluations); the rest is fitted
    # by a critic in the Stein form and scored on the held-out points.
    d, n = held["xf"].shape[1], held["n"]
    # C from the fit / validation data points (independent of the held-out blocks) with fresh noise, in two
    # halves of those data points for the bias correction
    idx_a = torch.cat([splits["fit"], splits["val"]])
    half_a, half_b = idx_a[: idx_a.numel() // 2], idx_a[idx_a.numel() // 2:]
    rounds = max(1, math.ceil(max(gram_points or 0, 2**15, 16 * d) / idx_a.numel()))
    big, *halves = Moments.of_halves(
        tuple(noisy_points(sde, x0[h], t, 1, generator, design="random")[0] for h in (half_a, half_b))
        for _ in range(rounds))
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    nb = min(n_blocks, n)
    block = torch.arange(n, device=dev).repeat(n_noise) % nb          # row k n + i belongs to held data point i
    counts = torch.bincount(block, minlength=nb).to(torch.float64)
    xc = held["xf"] - big.m
    # the model's own values s, not g: the affine gradients lie in G, so Pi_aff e = Pi_aff Pi_G e, and s keeps the
    # statistic unbiased whatever the error of the fit g ~ Pi_G s (its solenoidal part only adds variance)
    Bs = torch.stack([held["s"][block == j].T @ xc[block == j] / counts[j] for j in range(nb)]) + eye
    mus = torch.stack([held["s"][block == j].mean(0) for j in range(nb)])
    affine_value, affine_se = affine_norm_ustat(Bs, mus, big, halves)
    # fitted on the fit split alone: the validation split that accepts or rejects the critic must be out of sample
    # for everything the critic's target contains
    a_e = AffineGradient.project(pts["fit"]["xf"], pts["fit"]["s"], Moments.of(pts["fit"]["xf"]), extra_cross=eye)
    for p in pts.values():
        # Stein: (s - a_e) . grad psi + lap psi has the mean <e - a_e, grad psi> (no true score). The model's own
        # values, not the fit g: a fitting error of step 1 would be a gradient field the critic counts as error
        p["r"] = p["s"] - a_e(p["xf"])
    critic = critic if critic is not None else default_critic(x0[:2], sde, seed + 1)
    critic = _fit(critic, pts["fit"]["x"], pts["fit"]["r"], (pts["val"]["x"], pts["val"]["r"]), t, sigma,
                  steps=steps, batch_size=batch_size, lr=lr, generator=generator, stein=True)
    rest_pt = torch.zeros(held["x"].shape[0], dtype=torch.float64, device=dev)
    if critic is not None:
        # the critic's own affine part is taken out (projected on the fit points), so that it does not count again
        # what the affine U-statistic holds; what is left is kept only if it raises J significantly (2 standard
        # errors) on the validation points. Stein form throughout: no 1 / sigma_t noise, so small t stays resolved.
        fit, val = pts["fit"], pts["val"]
        a_psi = AffineGradient.project(fit["xf"], _grad_field(critic, fit["x"], t), Moments.of(fit["xf"]))

        def j_points(p):
            g, lap = _field(critic, p["x"], t, generator, laplacian=True)
            g = g - a_psi(p["xf"])
            return 2 * ((p["r"] * g).sum(1) + lap - a_psi.divergence()) - g.pow(2).sum(1)

        j_val = j_points(val)
        if float(j_val.mean()) > 2 * float(j_val.std()) / math.sqrt(j_val.numel()):
            rest_pt = j_points(held)
        else:
            critic = None

    rest, sol = _per_x0(rest_pt, n_noise, n), _per_x0(sol_pt, n_sol, n)

    def se(v):
        return float(v.std() / math.sqrt(v.numel()))

    common = {"t": t, "num_points": int(held["x"].shape[0]), "solenoidal_points": int(sol_pt.numel()),
              "method": "neural", "path_beta": beta,
              "potential_network": potential is not None, "critic_network": critic is not None}
    grad_value = affine_value + float(rest.mean())
    grad_se = math.sqrt(affine_se**2 + se(rest) ** 2)
    gradient = Estimate(grad_value, grad_se, {**common, "affine": affine_value, "affine_stderr": affine_se,
                                              "nonlinear": float(rest.mean()), "nonlinear_stderr": se(rest)})
    solenoidal = Estimate(float(sol.mean()), se(sol), dict(common))
    if held["true"] is not None:
        exact = _per_x0((held["s"] - held["true"]).pow(2).sum(1), n_noise, n)
        l2 = Estimate(float(exact.mean()), se(exact), {**common, "exact": True})
    else:
        # the rest and the solenoidal part come from the same held-out points and are correlated: their sum's spread
        l2 = Estimate(grad_value + solenoidal.value, math.sqrt(affine_se**2 + se(rest + sol) ** 2),
                      {**common, "exact": False})
    return {"gradient": gradient, "solenoidal": solenoidal, "l2": l2}
