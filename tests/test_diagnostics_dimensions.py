"""The default diagnostics (``decompose``, method "neural") against oracles from 2 dimensions up to image sizes
(docs/theory.md §8): pure gradient fields have no solenoidal part, conservative models whatever their weights, the
linear oracle's Lyapunov projection, a 128-D mixture with a zero-effect rotation, small times, calibrated errors.

Tolerances follow the issue's acceptance: gradient part within 10% of its truth, a zero solenoidal part below 5% of
``||e||^2``; the sizes (data points, model evaluations, fit steps) are the smallest at which the measured error sat
well inside them, to keep the suite fast."""
import math

import pytest
import torch
from test_diagnostics import linear_oracle

from gradscore import VPSDE, EnergyScore, TimeMLP
from gradscore.diagnostics import decompose, feature_decomposition
from gradscore.toy import GaussianMixture, skew_matrix

T = 0.2
FAST = {"steps": 300}


def _alpha_sigma(sde, t):
    tt = torch.tensor(t, dtype=torch.float64)
    return float(sde.alpha(tt)), float(sde.sigma(tt))


def _smooth_potential_gradient(d, seed=0, n_terms=8, scale=0.5, size=0.25):
    """grad phi of phi(x) = sum_k a_k sin(w_k . x + b_k), |w_k| ~ scale: a non-linear gradient field in R^d, its
    amplitudes scaled so that E|grad phi|^2 ~ size * d on N(0, 0.5 I)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_terms, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
    b = 2 * math.pi * torch.rand(n_terms, generator=g, dtype=torch.float64)
    a = torch.randn(n_terms, generator=g, dtype=torch.float64)
    x = math.sqrt(0.5) * torch.randn(4096, d, generator=g, dtype=torch.float64)
    a = a * math.sqrt(size * d / float(((torch.cos(x @ W.T + b) * a) @ W).pow(2).sum(1).mean()))
    return lambda x: (torch.cos(x.double() @ W.T + b) * a) @ W


@pytest.mark.parametrize("d", [2, 16, 48, 64, 256])
def test_pure_gradient_fields_have_no_solenoidal_part(d):
    """Data N(0, 0.25 I); (a) s = -x, e = (1/v - 1) x (the issue's case); (b) s = grad log p_t + grad phi with phi a
    random smooth potential. Both errors are gradients: solenoidal below 5% of ||e||^2, gradient part within 10%."""
    sde = VPSDE()
    a, s = _alpha_sigma(sde, T)
    v = a * a * 0.25 + s * s
    x0 = 0.5 * torch.randn(2048, d, generator=torch.Generator().manual_seed(d))
    grad_phi = _smooth_potential_gradient(d, seed=d)
    cases = {"linear": (lambda x, t: -x, (1 / v - 1) ** 2 * v * d)}
    xt = math.sqrt(v) * torch.randn(2**16, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cases["nonlinear"] = (lambda x, t: (-x.double() / v + grad_phi(x)).to(x.dtype),
                          float(grad_phi(xt).pow(2).sum(1).mean()))
    for name, (model, truth) in cases.items():
        out = decompose(model, sde, x0, T, num_points=2**13, generator=torch.Generator().manual_seed(2), options=FAST)
        g, sol = out["gradient"], out["solenoidal"]
        assert abs(sol.value) < 0.05 * truth, (d, name, sol, truth)
        assert abs(g.value - truth) < 0.10 * truth, (d, name, g, truth)


def test_energy_models_are_conservative_whatever_their_weights():
    """EnergyScore with random weights (an MLP at d = 64 and a diffusers UNet on 8x8 images): no solenoidal part,
    so the estimate is below 5% of the gradient part (the path potential holds -grad E exactly, up to quadrature)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from gradscore import DiscreteVPSDE

    torch.manual_seed(0)
    sde = VPSDE()
    mlp = EnergyScore(TimeMLP(64, hidden=64, depth=2, out_dim=1), sde, energy="scalar").eval()
    x0 = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    out = decompose(mlp, sde, x0, 0.3, num_points=2**11, generator=torch.Generator().manual_seed(1), options=FAST)
    assert abs(out["solenoidal"].value) < 0.05 * out["gradient"].value, out

    dsde = DiscreteVPSDE.from_scheduler(DDPMScheduler())
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    model = EnergyScore(unet, dsde).eval()
    x0 = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    for sol_points in (None, 256):           # all points, and one noise per data point for the solenoidal part
        out = decompose(model, dsde, x0, 0.3, num_points=2**10, generator=torch.Generator().manual_seed(1),
                        options={"steps": 100, "path_nodes": 6, "solenoidal_points": sol_points})
        assert abs(out["solenoidal"].value) < 0.05 * out["gradient"].value, (sol_points, out)


@pytest.mark.parametrize("d,solenoidal_points", [(16, None), (256, None), (256, 2**12)])
def test_linear_oracle_anisotropic(d, solenoidal_points):
    """Gaussian data with an anisotropic covariance, e = M x + b with a zero-effect part c C K0 (x - m), c = 2: the
    Lyapunov projection gives the truths; gradient, solenoidal and L2 within 10%, also when the solenoidal part
    uses a quarter of the points (one noise per data point)."""
    o = linear_oracle(d, 2.0, n0=4096)
    out = decompose(o["score"], o["sde"], o["x0"], 0.3, num_points=2**14, generator=torch.Generator().manual_seed(1),
                    options={**FAST, "solenoidal_points": solenoidal_points})
    used = out["gradient"].extra["num_points"]                # held-out points: 4 noises per held data point
    assert out["solenoidal"].extra["solenoidal_points"] == (used if solenoidal_points is None else used // 4)
    truth = {"gradient": o["grad"], "solenoidal": o["sol"], "l2": o["grad"] + o["sol"]}
    for key, value in truth.items():
        assert abs(out[key].value - value) < 0.10 * value, (d, key, out[key], value)


def test_mixture_128d_gradient_part_ignores_a_large_rotation():
    """A 4-component mixture in d = 128 (overlapping components: means ~ 1.5 apart, stds ~ 0.9 at t = 0.3),
    s = grad log p_t + grad phi + c J grad log p_t for c = 0, 2, 5: the gradient part stays within 10% of
    E|grad phi|^2 at every c (the rotation is removed noise-free before the critic sees it); the solenoidal part is
    within 10% of its Monte Carlo truth c^2 E|J grad log p_t|^2 (below 5% of ||e||^2 at c = 0)."""
    d, sde, t = 128, VPSDE(), 0.3
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(4, d, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(d),
                          0.5 * torch.eye(d, dtype=torch.float64).expand(4, d, d))
    J = skew_matrix(d, dtype=torch.float64)
    score = mix.score_fn(sde)
    grad_phi = _smooth_potential_gradient(d, seed=3)
    x0 = mix.sample(2048, generator=g)
    xt = mix.sample_marginal(2**15, t, sde, generator=g).double()
    truth_grad = float(grad_phi(xt).pow(2).sum(1).mean())
    rot = float((score(xt, t) @ J.T).pow(2).sum(1).mean())
    for c in (0.0, 2.0, 5.0):
        def model(x, tt, c=c):
            s = score(x, tt).double()
            return (s + grad_phi(x) + c * s @ J.T).to(x.dtype)

        out = decompose(model, sde, x0, t, num_points=2**13, generator=torch.Generator().manual_seed(2), options=FAST)
        assert abs(out["gradient"].value - truth_grad) < 0.10 * truth_grad, (c, out["gradient"], truth_grad)
        sol_truth = c**2 * rot
        tol = 0.10 * sol_truth if c else 0.05 * truth_grad
        assert abs(out["solenoidal"].value - sol_truth) < tol, (c, out["solenoidal"], sol_truth)


def test_features_and_neural_agree_at_d16():
    """Where both methods apply (d <= 32) they agree within their error bars (3 combined standard errors + 2%)."""
    o = linear_oracle(16, 1.0, n0=4096)
    gen = torch.Generator().manual_seed(1)
    feat = feature_decomposition(o["score"], o["sde"], o["x0"], 0.3, generator=gen)
    neur = decompose(o["score"], o["sde"], o["x0"], 0.3, num_points=2**14, generator=gen, options=FAST)
    for key in ("gradient", "solenoidal"):
        a, b = feat[key], neur[key]
        assert abs(a.value - b.value) < 3 * math.hypot(a.stderr, b.stderr) + 0.02 * abs(a.value), (key, a, b)


@pytest.mark.parametrize("t", [0.001, 0.01, 0.05, 0.3])
def test_small_times_2d(t):
    """The 'pair' mixture with a constant gradient error b (|b|^2 = 0.0625 at every t): the gradient part within 10%
    (or within 3 standard errors that are themselves at most 10% of the truth), the solenoidal part below 10% of
    ||e||^2 of zero. Small times are where the DSM residual's noise ~ 1 / sigma_t hides everything."""
    sde, mix = VPSDE(), GaussianMixture.preset("pair")
    b = torch.tensor([0.2, 0.15])
    truth = float(b.pow(2).sum())
    exact = mix.score_fn(sde)
    x0 = mix.sample(2**15, generator=torch.Generator().manual_seed(0))
    out = decompose(lambda x, tt: exact(x, tt) + b.to(x.dtype), sde, x0, t, num_points=2**17,
                    generator=torch.Generator().manual_seed(1), options=FAST)
    g, sol = out["gradient"], out["solenoidal"]
    assert abs(g.value - truth) < 0.10 * truth or (abs(g.value - truth) < 3 * g.stderr and g.stderr < 0.1 * truth), g
    assert abs(sol.value) < 0.10 * truth, sol


def test_standard_errors_match_the_spread_over_seeds():
    """Linear oracle, d = 16 (the issue's case): over 16 independent seeds (data, noise, fits), the mean reported
    standard error and the standard deviation of the values agree within a factor 1.5 for the gradient part, the
    solenoidal part and L2. Why 16 seeds: the sample std of n values is itself uncertain by ~1/sqrt(2(n-1)), 27% at
    n = 8, and seeds 0-7 alone happen to give a solenoidal spread of 0.53 against a stderr of 1.12 (a 2% tail of
    chi^2_7); seeds 8-31 give 1.17 against 1.14. With 16 seeds (18%) the factor 1.5 is more than 2 sds away."""
    vals = {k: [] for k in ("gradient", "solenoidal", "l2")}
    ses = {k: [] for k in vals}
    for seed in range(16):
        o = linear_oracle(16, 2.0, seed=0, n0=1024, data_seed=100 + seed)
        out = decompose(o["score"], o["sde"], o["x0"], 0.3, num_points=2**12,
                        generator=torch.Generator().manual_seed(seed), options={"steps": 150, "seed": seed})
        for k in vals:
            vals[k].append(out[k].value)
            ses[k].append(out[k].stderr)
    ratio = {k: float(torch.tensor(ses[k]).mean()) / float(torch.tensor(vals[k]).std()) for k in vals}
    assert all(1 / 1.5 < r < 1.5 for r in ratio.values()), ratio


def test_generator_on_another_device_and_conditioning_are_checked():
    sde = VPSDE()
    x0 = torch.randn(64, 2)
    with pytest.raises(ValueError, match="conditioning 'y'"):
        decompose(lambda x, t, y: -x, sde, x0, 0.3, y=torch.zeros(3))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on"):
            decompose(lambda x, t: -x, sde, x0, 0.3, generator=torch.Generator(device="cuda"))


def test_conditioning_reaches_the_model():
    """A label-conditional model s(x | y) = -x + shift_y on N(0, I) data: the decomposition is per label (the error
    of each conditional score, weighted by the label frequencies); each error is a constant, a gradient, so the
    gradient part is |shift|^2 = 0.09 and the solenoidal part ~ 0. Labels misaligned with their points would not
    give a gradient field per label."""
    sde = VPSDE()
    x0 = torch.randn(1024, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (1024,), generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([[0.3, 0.0], [0.0, -0.3]])
    model = lambda x, t, y: -x + shift[y]  # noqa: E731  (N(0, I) stays N(0, I) under VP: the exact score is -x)
    out = decompose(model, sde, x0, 0.3, num_points=2**13, generator=torch.Generator().manual_seed(2), options=FAST,
                    y=y)
    assert abs(out["solenoidal"].value) < 0.005, out
    assert abs(out["gradient"].value - 0.09) < 0.1 * 0.09 + 3 * out["gradient"].stderr, out


def test_solenoidal_points_must_be_positive():
    """A non-positive share of points for the solenoidal part is refused by name, before any model evaluation."""
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="solenoidal_points"):
        decompose(lambda x, t: -x, VPSDE(), x0, 0.3, num_points=256, options={"solenoidal_points": 0})
