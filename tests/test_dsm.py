"""DSMLoss (docs/theory.md §7) against its analytic value at the exact score of a Gaussian."""
import math

import pytest
import torch

from gradscore import DSMLoss, ScoreModel, TimeMLP
from gradscore.objectives.dsm import draw_perturbation, residual
from gradscore.objectives.weighting import WEIGHTINGS, resolve_weighting
from gradscore.sde import VESDE, VPSDE
from gradscore.toy import GaussianMixture

F64 = torch.float64


def gaussian(d, gen):
    """N(mu, Sigma) in R^d as a one-component mixture (its exact score at every t is the oracle's)."""
    A = torch.randn(d, d, generator=gen, dtype=F64)
    Sigma = A @ A.T / d + 0.1 * torch.eye(d, dtype=F64)
    return GaussianMixture(torch.randn(1, d, generator=gen, dtype=F64), Sigma[None])


def analytic_dsm_at_exact_score(g, sde, t, lam):
    """E[loss | t] = lambda(t) (d / sigma_t^2 - tr(C_t^-1)), C_t = alpha_t^2 Sigma + sigma_t^2 I."""
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    C = a**2 * g.covs[0] + s**2 * torch.eye(g.dim, dtype=F64)
    return lam * (g.dim / s**2 - torch.linalg.inv(C).trace().item())


def _mc_check(values, expected, n_se=5.0):
    """Monte Carlo: |mean - expected| < n_se standard errors (std error from the sample itself)."""
    mean, se = values.mean().item(), values.std().item() / math.sqrt(values.numel())
    assert abs(mean - expected) < n_se * se, f"mean {mean:.6g} vs expected {expected:.6g} (se {se:.3g})"
    return mean, se


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood", "none"])
@pytest.mark.parametrize("t", [0.02, 0.3, 0.9])
def test_dsm_at_exact_score_equals_analytic_value(sde, weighting, t, gen):
    """Oracle: at the exact score of N(mu, Sigma) (d = 3) and fixed t, E[loss] = lambda(t) (d / sigma_t^2 - tr C_t^-1).
    Monte Carlo with n = 20000 per-sample losses in float64; tolerance 5 standard errors, estimated from the
    losses themselves (false-alarm rate ~6e-7 per case)."""
    g = gaussian(3, gen)
    n = 20000
    objective = DSMLoss(sde, weighting=weighting)
    x0 = g.sample(n, generator=gen, dtype=F64)
    loss = objective(g.score_fn(sde), x0, t=t, generator=gen)
    assert loss.shape == (n,) and loss.dtype == F64
    lam = float(WEIGHTINGS[weighting](sde, torch.tensor(t, dtype=F64)))
    _mc_check(loss, analytic_dsm_at_exact_score(g, sde, t, lam))


def test_dsm_sees_the_score_error(gen):
    """DSM = lambda (||e||^2 + const): a constant error b added to the exact score raises E[loss] by exactly
    lambda |b|^2. Same x0 and noise for both models; the per-sample difference is averaged (n = 20000, 5 std errors)."""
    sde, t = VPSDE(), 0.4
    g = gaussian(2, gen)
    b = torch.tensor([0.3, -0.2], dtype=F64)
    x0 = g.sample(20000, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    objective = DSMLoss(sde, weighting="none")
    exact = objective(g.score_fn(sde), x0, t=t, noise=noise)
    shifted = objective(lambda x, tt: g.score(x, tt, sde) + b, x0, t=t, noise=noise)
    _mc_check(shifted - exact, b.pow(2).sum().item())


def test_dsm_per_sample_times_and_image_shapes(gen):
    """Per-sample t [B], dims summed over [B, C, H, W]; the loss is exactly lambda / sigma^2 |sigma s + eps|^2."""
    sde = VPSDE()
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    t = torch.tensor([0.1, 0.2, 0.5, 0.8], dtype=F64)
    model = lambda x, tt: -x                                                     # noqa: E731
    loss = DSMLoss(sde, "likelihood")(model, x0, t=t, noise=noise)
    a, s = sde.alpha(t)[:, None, None, None], sde.sigma(t)[:, None, None, None]
    xt = a * x0 + s * noise
    expected = sde.g2(t) / sde.sigma(t) ** 2 * (s * -xt + noise).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(residual(sde, -xt, noise, t), s * -xt + noise)


def test_dsm_random_times_reproducible_and_trainable(gen):
    """t=None draws t ~ U(t_min, 1) from the generator (same seed, same loss); gradients reach a ScoreModel;
    fp16 data is promoted to fp32 before x_t is formed."""
    sde = VPSDE()
    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(2, 16, 2), sde)
    x0 = torch.randn(64, 2, generator=gen)
    l1 = DSMLoss(sde)(model, x0, generator=torch.Generator().manual_seed(3))
    l2 = DSMLoss(sde)(model, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(l1, l2)
    l1.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    t, xt, _ = draw_perturbation(sde, x0.half(), generator=gen)
    assert xt.dtype == torch.float32 and t.shape == (64,)
    assert t.min() >= sde.t_min and t.max() <= 1


def test_weightings_and_errors():
    sde = VPSDE()
    t = torch.tensor([0.1, 0.5])
    torch.testing.assert_close(resolve_weighting("sigma2")(sde, t), sde.sigma(t) ** 2)
    torch.testing.assert_close(resolve_weighting("likelihood")(sde, t), sde.g2(t))
    custom = DSMLoss(sde, weighting=lambda sde, t: 2 * torch.ones_like(t))
    x0 = torch.zeros(2, 2)
    torch.testing.assert_close(custom(lambda x, tt: -x, x0, t=t, noise=torch.ones(2, 2)),
                               2 * DSMLoss(sde, "none")(lambda x, tt: -x, x0, t=t, noise=torch.ones(2, 2)))
    with pytest.raises(ValueError, match="weighting must be one of"):
        DSMLoss(sde, weighting="sigma")
    with pytest.raises(ValueError, match="weighting returned shape"):
        DSMLoss(sde, weighting=lambda sde, t: torch.ones(()))(lambda x, tt: -x, x0, t=t)
    with pytest.raises(TypeError, match="floating"):
        DSMLoss(sde)(lambda x, tt: -x, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="t must be"):
        DSMLoss(sde)(lambda x, tt: -x, x0, t=torch.zeros(3))
