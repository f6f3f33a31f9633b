"""Forward processes (docs/theory.md §1): each SDE's coefficients agree with its marginals, and the
discrete VP process reproduces a diffusers scheduler."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gradscore.sde import VESDE, VPSDE, DiscreteVPSDE, broadcast_to, time_tensor

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
    """Times away from the knots of the discrete schedule (mid-step: beta' jumps at the knots) and from 0, 1."""
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
    # between knots: the mean of beta over each step is the step's constant -d log(alphas_cumprod) / dt
    # (beta is quadratic on a step, so 2-point Gauss-Legendre is exact; 1e-10: rounding of the differences)
    gauss = torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], dtype=torch.float64)
    mean_beta = sde.beta((k[:-1, None].double() + gauss) / (N - 1)).mean(1)
    torch.testing.assert_close(mean_beta, -(ac[1:].log() - ac[:-1].log()) * (N - 1), rtol=1e-10, atol=0)


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
    prior = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                       torch.tensor(sde.prior_std(), dtype=torch.float64))
    ref = prior.log_prob(xp).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(xp), ref, rtol=1e-10, atol=1e-10)
    ts = sde.sample_time(1000, generator=gen)
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


SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_discrete_vp_interpolates_log_alpha2_by_pchip(schedule):
    """Oracle: scipy's PchipInterpolator of log(alphas_cumprod) over the step grid, its value and its
    derivative (beta = -d/dt log alpha_t^2), at 2000 random times; float64, tolerance 1e-10 relative
    (the same cubic evaluated in a different order). beta >= 0 and continuous everywhere: the interpolant
    of monotone data is monotone, and its two one-sided limits agree at every knot (1e-9 relative)."""
    from scipy.interpolate import PchipInterpolator

    ac = DDPMScheduler(beta_schedule=schedule).alphas_cumprod.double()
    sde = DiscreteVPSDE(ac)
    ref = PchipInterpolator(torch.arange(N).double().numpy(), ac.log().numpy())
    t = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = (t * (N - 1)).numpy()
    torch.testing.assert_close(sde.alpha(t) ** 2, torch.from_numpy(ref(u)).exp(), rtol=1e-10, atol=0)
    torch.testing.assert_close(sde.beta(t), -(N - 1) * torch.from_numpy(ref(u, 1)), rtol=1e-10, atol=1e-12)
    assert torch.all(sde.beta(torch.linspace(0, 1, 20001, dtype=torch.float64)) >= 0)
    knots = torch.arange(1, N - 1, dtype=torch.float64)
    below, above = sde.beta((knots - 1e-9) / (N - 1)), sde.beta((knots + 1e-9) / (N - 1))
    torch.testing.assert_close(below, above, rtol=1e-6, atol=1e-9)


def test_discrete_vp_heun_ode_converges_at_second_order():
    """Exact Gaussian data N(0, v I), v = 0.25, under the DDPM schedule, carried from exact samples of p_1
    to t = 0 by the Heun probability-flow ODE with the exact score -x / (alpha_t^2 v + sigma_t^2).

    The flow is linear, x_0 = c x_1, so the relative variance error var(x_0) / var_0 - 1 is read off
    without Monte Carlo noise as (|x_0|^2 / |x_1|^2) (var_1 / var_0) - 1. Heun is second order when
    beta is continuous: the error must fall by a factor in [3, 5] from 100 to 200 and from 200 to 400
    steps (4 in the limit; higher-order terms at 100 steps; a first-order error would fall by 2, and the
    piecewise-constant beta of a linear interpolation of log alphas_cumprod stalled at +3.8e-3 at 100,
    250 and 500 steps), and be below 1e-4 at 400 steps."""
    from gradscore.sampling import sample
    from gradscore.toy import GaussianMixture

    sde, v = DiscreteVPSDE.from_scheduler(DDPM), 0.25
    target = GaussianMixture(torch.zeros(1, 2), v * torch.eye(2)[None])

    def variance(t):
        return float(sde.alpha(t) ** 2 * v + sde.sigma(t) ** 2)

    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * variance(1.0) ** 0.5
    errors = []
    for steps in (100, 200, 400):
        x0 = sample(target.score_fn(sde), sde, x1.shape, method="ode", steps=steps, x_T=x1, dtype=torch.float64)
        errors.append(abs(float(x0.pow(2).sum() / x1.pow(2).sum()) * variance(1.0) / variance(sde.t_min) - 1))
    assert 3 < errors[0] / errors[1] < 5 and 3 < errors[1] / errors[2] < 5, errors
    assert errors[2] < 1e-4, errors


def test_time_tensor_contract():
    """One coercion of times: numbers take like's dtype and device, floating tensors keep their dtype,
    integer tensors become floating, ``batch`` repeats a single time or checks a [B] tensor."""
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert time_tensor(0.5, x).dtype == torch.float64 and time_tensor(0.5, x).shape == ()
    assert time_tensor(0.5).dtype == torch.get_default_dtype()
    assert time_tensor(torch.tensor(0.5, dtype=torch.float32), x).dtype == torch.float32
    assert time_tensor(torch.tensor([1, 2, 3]), x).dtype == torch.float64
    torch.testing.assert_close(time_tensor(0.25, x, batch=3), torch.full((3,), 0.25, dtype=torch.float64))
    t = torch.tensor([0.1, 0.2, 0.3])
    assert time_tensor(t, x, batch=3) is t
    with pytest.raises(ValueError, match=r"B=3, got shape \(2,\)"):
        time_tensor(torch.tensor([0.1, 0.2]), x, batch=3)
    with pytest.raises(TypeError, match="str"):
        time_tensor("0.5", x)
