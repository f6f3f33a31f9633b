"""Training only the critic recovers the gradient part of a known score error (docs/theory.md §5, §8).

Wrong score at a fixed time t on a 2-D mixture (VP): ``s = grad log p_t + grad phi + c J grad log p_t``
with ``phi(x) = a.x + x^T B x / 2`` (B symmetric) and J the 2-D rotation generator. The error is
``e = grad phi + c J grad log p_t``; ``c J grad log p_t`` is p_t-solenoidal, so
``||Pi_G e||^2 = E|grad phi|^2 = |a|^2 + 2 a^T B E[x] + tr(B^2 E[x x^T])``, exact from the mixture's
moments, for every c; ``||e||^2`` grows by ``c^2 E|grad log p_t|^2`` (J preserves norms and the cross
term vanishes by orthogonality).

Tolerances: the critic's held-out objective J must be within 10% of ``E|grad phi|^2`` (the task's
acceptance bound); measured 1.004 (c=0) and 0.997 (c=5) against 1.007, with Monte Carlo standard
errors 0.004 and 0.03 on 2e5 held-out samples. The
DSM difference must match ``c^2 E|grad log p_t|^2`` within 5% (standard error about 1%).
"""
import pytest
import torch

import gradscore as gs
from gradscore.objectives import DSMLoss, DualSobolevLoss

T = 0.3
A_VEC = torch.tensor([0.6, -0.4], dtype=torch.float64)
B_MAT = torch.tensor([[0.5, 0.25], [0.25, -0.35]], dtype=torch.float64)


def grad_phi(x):
    return (A_VEC.to(x.dtype) + x @ B_MAT.to(x.dtype).T)


def exact_grad_phi_sq(mix, sde):
    """E|a + B x|^2 under p_t from the mixture's first two moments."""
    alpha, sigma = float(sde.alpha(torch.tensor(T))), float(sde.sigma(torch.tensor(T)))
    w = mix.weights
    mean = (w[:, None] * alpha * mix.means).sum(0)
    second = sum(w[k] * (alpha**2 * mix.covs[k] + sigma**2 * torch.eye(2, dtype=torch.float64)
                         + alpha**2 * torch.outer(mix.means[k], mix.means[k])) for k in range(len(w)))
    return float(A_VEC @ A_VEC + 2 * A_VEC @ B_MAT @ mean + torch.trace(B_MAT @ B_MAT @ second))


def wrong_score(mix, sde, c):
    K = gs.toy.skew_matrix(2, dtype=torch.float64)

    def score(x, t):
        s = mix.score(x, t, sde)
        return s + grad_phi(x) + c * s @ K.to(s.dtype).T

    return score


def fit_critic(mix, sde, score, steps=600, batch=512, seed=0):
    torch.manual_seed(seed)
    critic = gs.Critic(gs.TimeMLP(2, 64, 2, out_dim=1), sde)
    obj = DualSobolevLoss(sde, critic, weighting="none")
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = obj.critic_loss(score, mix.sample(batch, generator=g), t=T, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return obj


@pytest.mark.slow
@pytest.mark.parametrize("c", [0.0, 5.0])
def test_critic_recovers_the_gradient_part_for_any_solenoidal_perturbation(c):
    mix, sde = gs.toy.GaussianMixture.preset("anisotropic"), gs.VPSDE()
    target = exact_grad_phi_sq(mix, sde)
    score = wrong_score(mix, sde, c)
    obj = fit_critic(mix, sde, score)
    held_out = mix.sample(200_000, generator=torch.Generator().manual_seed(99))
    estimate = float(obj.projection(score, held_out, t=T, generator=torch.Generator().manual_seed(98)).mean())
    assert abs(estimate - target) < 0.10 * target, (c, estimate, target)


@pytest.mark.slow
def test_dsm_loss_grows_by_the_solenoidal_norm():
    mix, sde = gs.toy.GaussianMixture.preset("anisotropic"), gs.VPSDE()
    x0 = mix.sample(200_000, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    dsm = DSMLoss(sde, weighting="none")
    c = 5.0
    growth = float((dsm(wrong_score(mix, sde, c), x0, t=T, noise=eps)
                    - dsm(wrong_score(mix, sde, 0.0), x0, t=T, noise=eps)).mean())
    xt, _ = sde.perturb(x0.double(), torch.full((len(x0),), T, dtype=torch.float64), noise=eps.double())
    expected = c**2 * float(mix.score(xt, T, sde).pow(2).sum(1).mean())
    assert abs(growth - expected) < 0.05 * expected, (growth, expected)
