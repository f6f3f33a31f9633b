"""Gaussian-mixture oracle (docs/theory.md §8) and the zero-effect perturbation (docs/theory.md §3)."""
import pytest
import torch

from gradscore.sde import VESDE, VPSDE, DiscreteVPSDE
from gradscore.toy import PRESETS, GaussianMixture, add_zero_effect, skew_matrix

SDES = {"vp": VPSDE(), "ve": VESDE(0.01, 10.0),
        "discrete_vp": DiscreteVPSDE(torch.linspace(0.9999, 1e-4, 1000).cumprod(0).clamp(min=1e-6))}


def random_mixture(d, K, gen):
    """K components in R^d with random means, random SPD covariances (condition number ~ 10) and weights."""
    means = 2 * torch.randn(K, d, generator=gen, dtype=torch.float64)
    A = torch.randn(K, d, d, generator=gen, dtype=torch.float64)
    covs = 0.3 * (A @ A.transpose(1, 2)) / d + 0.05 * torch.eye(d, dtype=torch.float64)
    weights = torch.rand(K, generator=gen, dtype=torch.float64) + 0.2
    return GaussianMixture(means, covs, weights)


def reference_log_prob(gm, x, t, sde):
    """Independent oracle: torch.distributions mixture of N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I), one per
    sample."""
    a, s = sde.alpha(t), sde.sigma(t)                                              # [B]
    loc = a[:, None, None] * gm.means[None]                                        # [B, K, d]
    eye = torch.eye(gm.dim, dtype=torch.float64)
    cov = a[:, None, None, None] ** 2 * gm.covs[None] + s[:, None, None, None] ** 2 * eye          # [B, K, d, d]
    comp = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)
    mix = torch.distributions.Categorical(probs=gm.weights.expand(len(t), -1))
    return torch.distributions.MixtureSameFamily(mix, comp).log_prob(x)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("d", [2, 5])
def test_score_is_gradient_of_log_prob(sde_name, d, gen):
    """Oracles: (1) log p_t against torch.distributions' mixture density; (2) score == autograd grad_x log p_t.
    Per-sample times [B] spanning nearly clean to nearly pure noise. float64; tolerance 1e-9 relative
    (the two sides differ only by rounding: eigendecomposition vs Cholesky, softmax vs autograd of logsumexp)."""
    sde = SDES[sde_name]
    gm = random_mixture(d, 4, gen)
    B = 64
    t = torch.rand(B, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    x = (gm.sample_marginal(B, 0.3, sde, generator=gen, dtype=torch.float64)
         + 0.5 * torch.randn(B, d, generator=gen, dtype=torch.float64))
    logp = gm.log_prob(x, t, sde)
    torch.testing.assert_close(logp, reference_log_prob(gm, x, t, sde), rtol=1e-9, atol=1e-9)
    xg = x.clone().requires_grad_(True)
    (autograd_score,) = torch.autograd.grad(gm.log_prob(xg, t, sde).sum(), xg)
    torch.testing.assert_close(gm.score(x, t, sde), autograd_score, rtol=1e-9, atol=1e-9)
    # a float time is the same as a constant [B] tensor; sde=None is t = 0 (the data density)
    torch.testing.assert_close(gm.score(x, 0.4, sde), gm.score(x, torch.full((B,), 0.4, dtype=torch.float64), sde))
    torch.testing.assert_close(gm.score_fn(sde)(x, t), gm.score(x, t, sde))


def test_time_zero_density_and_dtype(gen):
    """sde=None is the data density sum_k pi_k N(mu_k, Sigma_k) (torch.distributions, 1e-9); float32 in, float32 out."""
    gm = random_mixture(3, 3, gen)
    x = gm.sample(50, generator=gen, dtype=torch.float64)
    comp = torch.distributions.MultivariateNormal(gm.means, covariance_matrix=gm.covs)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=gm.weights), comp).log_prob(x)
    torch.testing.assert_close(gm.log_prob(x), ref, rtol=1e-9, atol=1e-9)
    assert gm.score(x.float(), 0.5, VPSDE()).dtype == torch.float32
    assert gm.log_prob(x.float(), 0.5, VPSDE()).dtype == torch.float32


def _mixture_moments(gm, a, s):
    mean = (gm.weights[:, None] * a * gm.means).sum(0)
    second = (gm.weights[:, None, None] * (a**2 * gm.covs + s**2 * torch.eye(gm.dim, dtype=torch.float64)
                                            + a**2 * gm.means[:, :, None] * gm.means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize("t", [0.0, 0.2, 0.7])
def test_samples_have_the_mixture_moments(t, gen):
    """Oracle: mean sum_k pi_k a mu_k and covariance sum_k pi_k (a^2 Sigma_k + s^2 I + a^2 mu_k mu_k^T) - m m^T
    of p_t. Monte Carlo with n = 40000; tolerance 5 standard errors (std error of each coordinate's mean is
    sqrt(var / n); of each covariance entry at most sqrt(E[(x_i x_j)^2] / n), bounded via the 4th moments
    of the sample itself)."""
    sde = VPSDE()
    gm = GaussianMixture.preset("anisotropic")
    n = 40000
    if t == 0:
        x = gm.sample(n, generator=gen, dtype=torch.float64)
    else:
        x = gm.sample_marginal(n, t, sde, generator=gen, dtype=torch.float64)
    a, s = (1.0, 0.0) if t == 0 else (float(sde.alpha(t)), float(sde.sigma(t)))
    mean, cov = _mixture_moments(gm, a, s)
    xc = x - x.mean(0)
    se_mean = (xc.var(0) / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() < 5 * se_mean), (x.mean(0), mean)
    prod = xc[:, :, None] * xc[:, None, :]
    se_cov = (prod.var(0) / n).sqrt()
    tolerance = 5 * se_cov + 5 * se_mean[:, None] * se_mean[None, :]
    assert torch.all((prod.mean(0) - cov).abs() < tolerance), (prod.mean(0), cov)


def test_presets():
    """Every named preset is a 2-D mixture; ring8 has 8 modes at radius 2; an unknown name says which exist."""
    for name in PRESETS:
        gm = GaussianMixture.preset(name)
        assert gm.dim == 2 and torch.isclose(gm.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    ring = GaussianMixture.preset("ring8")
    assert ring.num_components == 8
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="ring8"):
        GaussianMixture.preset("nope")


def test_constructor_errors():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture(torch.zeros(2, 2), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), None, [1.0, -1.0])
    gm = GaussianMixture.preset("pair")
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        gm.score(torch.zeros(4, 3), 0.5, VPSDE())
    with pytest.raises(ValueError, match="t must be"):
        gm.score(torch.zeros(4, 2), torch.zeros(3), VPSDE())


def test_skew_matrix():
    for d in (2, 3, 6):
        J = skew_matrix(d, dtype=torch.float64)
        torch.testing.assert_close(J.T, -J)
        assert (J != 0).sum() == 2 * (d // 2)


@pytest.mark.parametrize("d", [2, 4])
def test_zero_effect_field_is_divergence_free_for_p_t(d, gen):
    """docs/theory.md §3 oracle: w = c J grad log p_t satisfies div(p_t w) = 0, i.e. div w + grad log p_t . w = 0.
    Divergence by exact autograd (one backward per coordinate) in float64 on a random mixture; tolerance
    1e-9 relative to the size of each term (|div w| + |s.w| are O(10) here and cancel to rounding)."""
    sde = VPSDE()
    gm = random_mixture(d, 3, gen)
    J = torch.randn(d, d, generator=gen, dtype=torch.float64)
    J = J - J.T
    c = 2.0
    w_fn = add_zero_effect(gm.score_fn(sde), c, J)
    s_fn = gm.score_fn(sde)
    x = gm.sample_marginal(32, 0.1, sde, generator=gen, dtype=torch.float64).requires_grad_(True)
    t = torch.full((32,), 0.1, dtype=torch.float64)
    w = w_fn(x, t) - s_fn(x, t)                                   # the added field c J s
    torch.testing.assert_close(w, c * s_fn(x, t) @ J.T)
    div = sum(torch.autograd.grad(w[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(d))
    s_dot_w = (s_fn(x, t) * w).sum(1)
    scale = div.abs() + s_dot_w.abs() + 1.0
    assert torch.all((div + s_dot_w).abs() < 1e-9 * scale)
    # yet the L2 error is large: c^2 |J s|^2 per point
    assert (w.pow(2).sum(1).mean() > 1.0)


def test_zero_effect_default_and_errors(gen):
    """Default J is skew_matrix on the flattened dims (works for [B, *D]); a non-skew J is refused."""
    def s(x, t):
        return -x
    x = torch.randn(3, 2, 2, generator=gen)
    out = add_zero_effect(s, 0.5)(x, 0.1)
    J = skew_matrix(4)
    torch.testing.assert_close(out, (-x.flatten(1) - 0.5 * x.flatten(1) @ J.T).reshape(x.shape))
    with pytest.raises(ValueError, match="skew"):
        add_zero_effect(s, 1.0, torch.eye(2))
