"""Neural-critic estimate of ``||Pi_G e_t||^2`` (THEORY 5 and 6.1), for any data shape (images included).

A scalar critic ``psi_eta(x)`` (``gradscore.Critic``: ``psi = psi~ / sigma_t``) is fitted at one time ``t``
by maximising ``J(psi) = E[2 r . grad psi - |grad psi|^2]`` with the DSM residual
``r = s_theta(x_t) + eps / sigma_t`` (``E[r | x_t] = e_t(x_t)``, so ``J`` needs no true score) on the points of
a *train* half of the data; ``J`` of the fitted critic on the points of the other, *held-out* half is
an unbiased estimate of ``J(psi_eta) <= ||Pi_G e_t||^2``: an honest lower bound, whose gap is the critic's
approximation and optimisation error ``||grad psi_eta - Pi_G e||^2``. The standard error groups all
noises of one ``x_0``. The model is evaluated once per point (no graph through it).

Default critics: ``TimeMLP(d, out_dim=1)`` for flat data ``[B, d]``, ``ConvCritic`` for images ``[B, C, H, W]``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..critic import Critic
from ..nets import TimeMLP
from ..sde import SDE
from .estimate import Estimate
from .points import evaluate, noisy_points

__all__ = ["ConvCritic", "default_critic", "critic_gradient_error"]


class ConvCritic(nn.Module):
    """``(x [B, C, H, W], t [B]) -> [B]``: three 3x3 convolutions (SiLU, the last two strided), a global
    mean and a linear head. ``t`` is ignored (one critic is fitted per time)."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean((2, 3)))[:, 0]


def default_critic(example: torch.Tensor, sde: SDE, seed: int = 0) -> Critic:
    """A fresh critic for data shaped like ``example: [B, *D]`` (``[B, d]``: ``TimeMLP``; ``[B, C, H, W]``: conv)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if example.dim() == 2:
            backbone = TimeMLP(example.shape[1], hidden=128, depth=3, out_dim=1)
        elif example.dim() == 4:
            backbone = ConvCritic(example.shape[1])
        else:
            raise ValueError(f"no default critic for data of shape [B, *D] = {tuple(example.shape)}; "
                             "expected [B, d] or [B, C, H, W] (pass critic=...)")
    return Critic(backbone, sde, time_input="t")


def _objective(critic: Critic, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-point ``2 r . grad psi - |grad psi|^2``, ``[B]``."""
    g = critic(x, t).reshape(x.shape[0], -1)
    return 2 * (r.reshape(g.shape) * g).sum(1) - g.pow(2).sum(1)


def critic_gradient_error(score_fn, sde: SDE, x0: torch.Tensor, t: float, *, critic: Critic | None = None,
                          num_points: int | None = None, steps: int = 600, batch_size: int = 512, lr: float = 2e-3,
                          generator: torch.Generator | None = None, seed: int = 0) -> Estimate:
    """Held-out ``J`` of a critic fitted at time ``t`` (see the module docstring).

    Args:
        score_fn: ``(x [B, *D], t [B]) -> [B, *D]``.
        x0: data ``[N, *D]`` (``N >= 4``), split in halves: fit / held-out.
        critic: a ``gradscore.Critic`` (trained in place); default ``default_critic``.
        num_points: points of ``p_t`` per half (default ``2^15``).
        steps, batch_size, lr: Adam on the fit half (lr decays by cosine to 0).
    Returns:
        ``Estimate`` (held-out J, stderr over held-out ``x_0``); ``extra``: ``lower_bound`` (the same
        value: it is a lower bound), ``train_J``, ``steps``, ``num_points``.
    """
    N = x0.shape[0]
    if N < 4:
        raise ValueError(f"x0 needs at least 4 samples (two halves), got {N}")
    t = float(t)
    num_points = 2**15 if num_points is None else int(num_points)
    perm = torch.randperm(N, generator=generator)
    halves = perm[: N // 2], perm[N // 2:]
    sigma = float(sde.sigma(torch.tensor(t, dtype=torch.float64)))
    data = []
    for idx in halves:
        n_noise = max(1, math.ceil(num_points / idx.numel()))
        xt, eps = noisy_points(sde, x0[idx], t, n_noise, generator)
        s = evaluate(score_fn, xt, t)
        data.append((xt.float(), (s + eps / sigma).float(), n_noise, idx.numel()))
    critic = critic if critic is not None else default_critic(x0[:2], sde, seed)
    param = next(critic.parameters())
    dev = param.device
    (x_fit, r_fit, _, _), (x_ho, r_ho, n_noise_ho, n_ho) = data
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    critic.train()
    train_J = float("nan")
    for _ in range(steps):
        i = torch.randint(0, x_fit.shape[0], (batch_size,), generator=generator)
        xb, rb = x_fit[i].to(dev), r_fit[i].to(dev)
        tb = torch.full((xb.shape[0],), t, device=dev)
        with torch.enable_grad():
            # scaled by sigma_t^2 (r ~ eps / sigma_t): the same optimum, an O(1) loss at every t
            J = _objective(critic, xb, rb, tb).mean()
            loss = -sigma**2 * J
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        train_J = float(J.detach())
    critic.eval()
    vals = []
    for c0 in range(0, x_ho.shape[0], 4096):
        xb = x_ho[c0:c0 + 4096].to(dev)
        tb = torch.full((xb.shape[0],), t, device=dev)
        with torch.no_grad():
            vals.append(_objective(critic, xb, r_ho[c0:c0 + 4096].to(dev), tb).double().cpu())
    per_x0 = torch.cat(vals).reshape(n_noise_ho, n_ho).mean(0)          # row k n + i noises x0[i]
    value = float(per_x0.mean())
    return Estimate(value, float(per_x0.std() / math.sqrt(n_ho)),
                    {"t": t, "lower_bound": value, "train_J": train_J, "steps": steps,
                     "num_points": int(x_ho.shape[0]), "method": "critic"})
