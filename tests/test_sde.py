"""Forward processes (THEORY section 1): each SDE's coefficients agree with its marginals, and the
discrete VP process reproduces a diffusers scheduler."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gradscore.sde import VESDE, VPSDE, DiscreteVPSDE, broadcast_to

DDPM = DDPMScheduler()                     # 1000 steps, linear betas 1e-4 .. 0.02
N = DDPM.config.num_train_timesteps


def _processes():
    return {
        "vp": VPSDE(0.1, 20.0),
        "ve": VESDE(0.01, 50.0),
        "discrete_vp": DiscreteVPSDE.from_scheduler(DDPM),
        "discrete_vp_cosine": DiscreteVPSDE.from_scheduler(DDIMScheduler(beta_schedule="squaredcos_cap_v2")),
    }


def _interior_times(sde):
    """Times away from the kinks of the piecewise-linear discrete schedule (mid-segment) and from 0, 1."""
    if isinstance(sde, DiscreteVPSDE):
        k = torch.tensor([3, 100, 400, 700, 990], dtype=torch.float64)
        return (k + 0.5) / (sde.num_steps - 1), 1e-3 / (sde.num_steps - 1)
    return torch.tensor([0.01, 0.1, 0.37, 0.5, 0.8, 0.99], dtype=torch.float64), 1e-5


@pytest.mark.parametrize("name", list(_processes()))
def test_drift_and_diffusion_match_marginals(name):
    """Oracle: for x_t = alpha_t x_0 + sigma_t eps driven by dx = f x dt + g dW,
    d log alpha_t / dt = f(t) and d sigma_t^2 / dt = 2 f(t) sigma_t^2 + g(t)^2.
    Central differences in float64 with step h; tolerance 1e-6 relative: the truncation error is
    O(h^2 |third derivative|) (<1e-8 here, the steep end of the cosine schedule is the worst) and roundoff
    O(1e-16 / h) (<1e-9)."""
    sde = _processes()[name]
    t, h = _interior_times(sde)
    dlog_alpha = (sde.alpha(t + h).log() - sde.alpha(t - h).log()) / (2 * h)
    dsigma2 = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    f, g2 = sde.drift_coef(t), sde.g2(t)
    torch.testing.assert_close(dlog_alpha, f, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dsigma2, 2 * f * sde.sigma(t) ** 2 + g2, rtol=1e-6, atol=1e-9)
    assert torch.allclose(sde.diffusion(t) ** 2, g2)
    x = torch.randn(len(t), 3, dtype=torch.float64)
    torch.testing.assert_close(sde.drift(x, t), f[:, None] * x)


@pytest.mark.parametrize("name", ["vp", "discrete_vp"])
def test_variance_preserving(name):
    """VP processes: alpha_t^2 + sigma_t^2 = 1 (float64 rounding, 1e-12)."""
    sde = _processes()[name]
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(sde.alpha(t) ** 2 + sde.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


def test_vp_closed_form():
    """VP: alpha_t = exp(-1/2 int_0^t beta) with linear beta; small-t sigma stays accurate (expm1)."""
    sde = VPSDE(0.1, 20.0)
    t = torch.tensor([0.0, 1e-6, 0.3, 1.0], dtype=torch.float64)
    integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
    torch.testing.assert_close(sde.alpha(t), torch.exp(-0.5 * integral), rtol=1e-14, atol=0)
    torch.testing.assert_close(sde.sigma(t), torch.sqrt(-torch.expm1(-integral)), rtol=1e-14, atol=0)
    assert sde.sigma(torch.tensor(1e-6, dtype=torch.float32)) > 0     # float32 too: no 1 - 1 cancellation
    ve = VESDE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * 5000.0**t, rtol=1e-14, atol=0)
    assert torch.all(ve.alpha(t) == 1)


def test_discrete_vp_matches_scheduler_at_integer_steps():
    """Oracle: diffusers' alphas_cumprod. At t = k / (N - 1), alpha_t^2 == alphas_cumprod[k]
    (float64 interpolation at a knot; tolerance 1e-12 relative, rounding of t * (N - 1))."""
    sde = DiscreteVPSDE.from_scheduler(DDPM)
    k = torch.arange(N)
    t = k.double() / (N - 1)
    ac = DDPM.alphas_cumprod.double()
    torch.testing.assert_close(sde.alpha(t) ** 2, ac, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.sigma(t) ** 2, 1 - ac, rtol=1e-9, atol=1e-15)
    # t <-> timestep mapping is what the UNet was trained with, and round-trips
    torch.testing.assert_close(sde.timestep(t), k.double())
    torch.testing.assert_close(sde.t_from_timestep(k.double()), t)
    # between knots: beta is the per-segment constant -d log(alphas_cumprod) / dt
    torch.testing.assert_close(sde.beta((k[:-1].double() + 0.5) / (N - 1)),
                               -(ac[1:].log() - ac[:-1].log()) * (N - 1), rtol=1e-12, atol=0)


def test_discrete_vp_perturb_matches_add_noise(gen):
    """Oracle: DDPMScheduler.add_noise(x0, eps, k) = sqrt(ac_k) x0 + sqrt(1 - ac_k) eps. Same inputs in
    float32; tolerance 1e-5 absolute (float32 rounding of t = k / (N - 1) and of the table)."""
    sde = DiscreteVPSDE.from_scheduler(DDPM)
    x0 = torch.randn(6, 3, 8, 8, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    k = torch.tensor([0, 1, 250, 500, 998, 999])
    xt, eps_out = sde.perturb(x0, k.float() / (N - 1), noise=eps)
    assert eps_out is eps
    torch.testing.assert_close(xt, DDPM.add_noise(x0, eps, k), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(_processes()))
def test_perturb_per_sample_times_and_prior(name, gen):
    """perturb broadcasts [B] times over [B, *D]; the drawn eps is returned; the prior is N(0, prior_std^2 I)
    with log-density checked against torch.distributions (1e-10, float64)."""
    sde = _processes()[name]
    x0 = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    xt, eps = sde.perturb(x0, t, generator=gen)
    expected = broadcast_to(sde.alpha(t), x0) * x0 + broadcast_to(sde.sigma(t), x0) * eps
    torch.testing.assert_close(xt, expected)
    assert sde.alpha(t).shape == sde.sigma(t).shape == sde.g2(t).shape == (5,)
    xp = sde.prior_sample((7, 4), generator=gen, dtype=torch.float64)
    ref = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(sde.prior_std(), dtype=torch.float64)).log_prob(xp).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(xp), ref, rtol=1e-10, atol=1e-10)
    ts = sde.sample_t(1000, generator=gen)
    assert ts.shape == (1000,) and ts.min() >= sde.t_min and ts.max() <= sde.T


def test_prior_matches_terminal_marginal():
    """At T = 1 the marginal of a unit-scale x_0 is close to the prior: VP alpha_1 ~ 6e-3, VE sigma_1 = sigma_max."""
    vp = VPSDE()
    assert float(vp.alpha(1.0)) < 1e-2 and abs(float(vp.sigma(1.0)) - vp.prior_std()) < 1e-4
    ve = VESDE(0.01, 50.0)
    assert abs(float(ve.sigma(1.0)) - ve.prior_std()) < 1e-4


def test_argument_errors():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="non-increasing"):
        DiscreteVPSDE(torch.tensor([0.5, 0.9]))
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiscreteVPSDE.from_scheduler(object())
    with pytest.raises(ValueError, match="noise"):
        VPSDE().perturb(torch.zeros(2, 3), 0.5, noise=torch.zeros(2, 4))
    assert math.isclose(float(VPSDE().timestep(0.5)), 499.5)
