"""Likelihood by the probability-flow ODE and bits/dim (gradscore.diagnostics.likelihood; docs/theory.md §9.1-9.2).

Oracles: with the exact score of a Gaussian mixture the ODE's density is the mixture's own ``p_t0``
(``GaussianMixture.log_prob(x, t0, sde)``, exact) up to (i) the prior mismatch ``log p_T(x_T) - log pi(x_T)``,
pointwise of order ``alpha_T |mu| |x_T|`` (VP, T=1: ``alpha_T = 6.6e-3``, so a few 1e-2 nats for means of norm ~6;
its average, KL(p_T || pi), is second order, ~1e-4) and (ii) the RK45 error at rtol = atol = 1e-5 (measured
~1e-3 nats). Both are far inside 1% of ``|log p|`` (2-10 nats here). Replacing ``pi`` by the exact ``p_T`` at the ODE's
end point removes (i), which gives a much sharper check of the integral itself.
"""
import math

import pytest
import torch

from gradscore import VPSDE, EnergyScore, TimeMLP
from gradscore.diagnostics import bits_per_dim, log_likelihood
from gradscore.toy import GaussianMixture


@pytest.fixture(scope="module")
def sde():
    return VPSDE()


def _mixture_16d():
    g = torch.Generator().manual_seed(3)
    means = 1.5 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    return GaussianMixture(means, 0.2 * torch.eye(16, dtype=torch.float64).expand(4, 16, 16))


@pytest.mark.parametrize("preset", ["ring8", "anisotropic"])
def test_exact_score_2d_matches_mixture_log_prob(sde, preset, gen):
    mix = GaussianMixture.preset(preset)
    x = mix.sample(64, generator=gen, dtype=torch.float64)
    logq, stats = log_likelihood(mix.score_fn(sde), sde, x, return_stats=True)      # d = 2: exact divergence
    ref = mix.log_prob(x, sde.t_min, sde)
    assert logq.shape == (64,) and logq.dtype == torch.float64
    assert ((logq - ref).abs() / ref.abs()).max() < 0.01
    assert torch.allclose(logq, stats["prior_logp"] + stats["delta_logp"])
    assert stats["nfe"] > 0
    # with the exact p_T in place of pi only the solver's error is left: up to 3e-3 nats at rtol 1e-5 (above),
    # < 1e-7 measured at rtol = atol = 1e-8, so the integral converges to the exact log-density
    _, tight = log_likelihood(mix.score_fn(sde), sde, x, rtol=1e-8, atol=1e-8, return_stats=True)
    sharp = mix.log_prob(tight["x_T"], sde.T, sde) + tight["delta_logp"]
    assert (sharp - ref).abs().max() < 1e-5


def test_exact_score_16d_exact_divergence(sde, gen):
    mix = _mixture_16d()
    x = mix.sample(32, generator=gen, dtype=torch.float64)
    logq = log_likelihood(mix.score_fn(sde), sde, x)                 # d = 16: the default is still exact
    ref = mix.log_prob(x, sde.t_min, sde)
    # measured: max 0.34% (the pointwise prior mismatch, ~0.04 nats, and the solver's ~0.02)
    assert ((logq - ref).abs() / ref.abs()).max() < 0.01


def test_exact_score_16d_hutchinson_unbiased(sde, gen):
    """Hutchinson per point, averaged over 512 probes (8 points x 64 rows x 8 probes): within 1% of the oracle and
    within 4 standard errors of it (the probes are the only randomness; the rows of a point follow one trajectory)."""
    mix = _mixture_16d()
    pts, reps = 8, 64
    x = mix.sample(pts, generator=gen, dtype=torch.float64).repeat_interleave(reps, 0)
    logq = log_likelihood(mix.score_fn(sde), sde, x, method="hutchinson", n_probes=8,
                          generator=torch.Generator().manual_seed(1)).reshape(pts, reps)
    ref = mix.log_prob(x[::reps], sde.t_min, sde)
    mean, se = logq.mean(1), logq.std(1) / math.sqrt(reps)
    assert (se > 1e-3).all()                        # the estimate is random (the check below is not vacuous)
    assert ((mean - ref).abs() / ref.abs()).max() < 0.01
    # + 0.05: the deterministic part (prior mismatch and solver error, <= 0.04 nats measured by the exact divergence)
    assert ((mean - ref).abs() < 4 * se + 0.05).all()


def test_energy_score_hutchinson_agrees_with_exact(sde):
    """An EnergyScore (its score is -grad E taken inside forward; the divergence differentiates through it) with
    random weights in d = 3: per point, Hutchinson over 64 single-probe rows agrees with the exact divergence
    within 4 of its standard errors, in float64 (solver differences ~1e-5 nats are negligible against them)."""
    torch.manual_seed(0)
    model = EnergyScore(TimeMLP(3, hidden=32, depth=2), sde, energy="inner").double().eval()
    pts, reps = 3, 64
    x = torch.randn(pts, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = log_likelihood(model, sde, x, method="exact", rtol=1e-4, atol=1e-4)
    hutch = log_likelihood(model, sde, x.repeat_interleave(reps, 0), method="hutchinson", probe="gaussian",
                           rtol=1e-4, atol=1e-4, generator=torch.Generator().manual_seed(3)).reshape(pts, reps)
    mean, se = hutch.mean(1), hutch.std(1) / math.sqrt(reps)
    assert torch.isfinite(exact).all() and (se > 1e-4).all()
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)


def test_cond_is_passed_per_sample_and_sliced_with_chunks(sde, gen):
    """A conditional score (label-indexed mixtures): each sample is scored under its own label; chunking slices
    the labels with x, so the result does not depend on the chunk size."""
    mixes = [GaussianMixture([[-1.0, 0.0]], 0.1 * torch.eye(2)[None]),
             GaussianMixture([[1.0, 1.0]], 0.3 * torch.eye(2)[None])]

    def score(x, t, label):
        return torch.where(label[:, None] == 0, mixes[0].score(x, t, sde), mixes[1].score(x, t, sde))

    label = torch.tensor([0, 1, 1, 0, 1])
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    ref = torch.stack([mixes[int(k)].log_prob(x[i:i + 1], sde.t_min, sde)[0] for i, k in enumerate(label)])
    full = log_likelihood(score, sde, x, label=label)
    chunked = log_likelihood(score, sde, x, label=label, chunk=2)
    assert ((full - ref).abs() / ref.abs()).max() < 0.01
    assert ((chunked - ref).abs() / ref.abs()).max() < 0.01
    with pytest.raises(ValueError, match="cond 'label'.*B=5"):
        log_likelihood(score, sde, x, label=label[:3])


def _gaussian_bpd_oracle(y, s2, sde, delta):
    """-(log N(y; 0, v I) + d log delta) / (d log 2), v = alpha_t0^2 s^2 + sigma_t0^2: the exact p_t0 of N(0, s^2 I)."""
    t0 = torch.tensor(sde.t_min, dtype=torch.float64)
    a, sig = sde.alpha(t0), sde.sigma(t0)
    v = a**2 * s2 + sig**2
    d = y[0].numel()
    y = y.reshape(y.shape[0], -1).double()
    logp = -0.5 * y.pow(2).sum(1) / v - 0.5 * d * torch.log(2 * math.pi * v)
    return -(logp + d * math.log(delta)) / (d * math.log(2)), v


def test_bits_per_dim_gaussian_closed_form(sde):
    """Data N(0, s^2 I) (continuous, s = 0.5) in d = 4, evaluated at 8-bit grid points: the exact score's bpd is
    the closed form of §9.2 at the dequantised point y = x + U / 127.5 (U drawn first from the generator, so the
    oracle reproduces it), within 1e-3 bits (measured 3e-5: solver error and prior mismatch, ~1e-4 nats, over
    d log 2 = 2.8; tight enough to catch the 2/256-width / log 128 convention on this 2/255 grid, off by 5.6e-3
    bits, docs/theory.md §9.2); its batch mean matches the closed-form expectation over U,
    E|x + Delta U|^2 = |x|^2 + Delta sum x + d Delta^2 / 3, within 4 standard errors of the U draw."""
    s2, d, B = 0.25, 4, 256
    mix = GaussianMixture(torch.zeros(1, d, dtype=torch.float64), s2 * torch.eye(d, dtype=torch.float64)[None])
    k = torch.randint(96, 160, (B, d), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)  # near 0
    bpd, stats = bits_per_dim(mix.score_fn(sde), sde, k.double() / 127.5 - 1,
                              generator=torch.Generator().manual_seed(5), return_stats=True)
    delta = 2 / 255
    u = torch.rand(B, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = k.double() / 127.5 - 1
    assert torch.allclose(stats["dequantised"], x + delta * u)
    ref, v = _gaussian_bpd_oracle(x + delta * u, s2, sde, delta)
    assert (bpd - ref).abs().max() < 1e-3
    # the expectation over U (checks the dequantisation's width): E[-log q] in closed form per sample
    e_sq = x.pow(2).sum(1) + delta * x.sum(1) + d * delta**2 / 3
    expected = -(-0.5 * e_sq / v - 0.5 * d * torch.log(2 * math.pi * v) + d * math.log(delta)) / (d * math.log(2))
    diff = bpd - expected
    assert diff.mean().abs() < 4 * diff.std() / math.sqrt(B) + 1e-3
    # uint8 input is the same computation (levels 0..255 scaled in the default dtype: float32 here)
    bpd_u8, st8 = bits_per_dim(mix.score_fn(sde), sde, k, generator=torch.Generator().manual_seed(5), return_stats=True)
    y8 = st8["dequantised"]
    assert y8.dtype == torch.float32 and ((y8.double() - x) >= -1e-6).all() and ((y8.double() - x) < delta).all()
    assert (bpd_u8 - _gaussian_bpd_oracle(y8, s2, sde, delta)[0]).abs().max() < 1e-3


def test_bits_per_dim_other_levels(sde):
    """17 levels (scikit-learn digits, x = k / 8 - 1): spacing 1/8 and the constant d log(1/8)."""
    s2, d = 0.25, 2
    mix = GaussianMixture(torch.zeros(1, d, dtype=torch.float64), s2 * torch.eye(d, dtype=torch.float64)[None])
    x = torch.tensor([[0.0, 0.125], [-0.25, 0.5]], dtype=torch.float64)
    bpd, stats = bits_per_dim(mix.score_fn(sde), sde, x, levels=17, generator=torch.Generator().manual_seed(0),
                              return_stats=True)
    ref, _ = _gaussian_bpd_oracle(stats["dequantised"], s2, sde, 1 / 8)
    assert (bpd - ref).abs().max() < 1e-3
    assert ((stats["dequantised"] - x) >= 0).all() and ((stats["dequantised"] - x) < 1 / 8).all()


def test_bits_per_dim_input_errors(sde):
    score = GaussianMixture.preset("pair").score_fn(sde)
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\].*got values in \[0, 255\]"):
        bits_per_dim(score, sde, torch.tensor([[0.0, 255.0]]))              # forgot to scale
    with pytest.raises(ValueError, match="not on the grid of levels=256"):
        bits_per_dim(score, sde, torch.tensor([[0.1, 0.2], [0.3, -0.4]]))     # continuous data
    with pytest.raises(ValueError, match="levels 0..255"):
        bits_per_dim(score, sde, torch.tensor([[0, 300], [2, 3]]))
    with pytest.raises(ValueError, match="not on the grid of levels=256.*digits: 17"):
        bits_per_dim(score, sde, torch.tensor([[0.125, 0.0], [0.0, 0.0]]))   # 17-level data passed as 8-bit
    with pytest.raises(ValueError, match="dequantise must be 'uniform'"):
        bits_per_dim(score, sde, torch.zeros(2, 2), dequantise="none")
    with pytest.raises(ValueError, match="non-finite"):
        bits_per_dim(score, sde, torch.tensor([[float("nan"), 0.0]]))


def test_non_finite_score_names_samples(sde):
    def score(x, t, bad):                    # NaN for the flagged samples once t > 0.5
        return torch.where(bad[:, None] & (t[:, None] > 0.5), torch.full_like(x, float("nan")), -x)

    bad = torch.tensor([False, True, False, True, False])
    with pytest.raises(FloatingPointError, match=r"score is non-finite at t=.* for samples \[1, 3\]"):
        log_likelihood(score, sde, torch.randn(5, 2), bad=bad)
    bad = torch.tensor([False, False, False, True, False])          # in the second chunk: named as an index into x
    with pytest.raises(FloatingPointError, match=r"samples \[3\]"):
        log_likelihood(score, sde, torch.randn(5, 2), bad=bad, chunk=3)


def test_argument_errors(sde):
    score = GaussianMixture.preset("pair").score_fn(sde)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        log_likelihood(score, sde, x, method="trace")
    with pytest.raises(ValueError, match="t0 must be in"):
        log_likelihood(score, sde, x, t0=1.0)
    with pytest.raises(ValueError, match="n_probes"):
        log_likelihood(score, sde, x, method="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="shaped like x"):
        log_likelihood(lambda x, t: x[:, :1], sde, x)


# ----------------------------------------------------------------------------- the training driver
def test_driver_toy_nll_with_the_exact_score(sde):
    """evaluation.likelihood on a toy source with the exact score as the model: the model NLL equals the target's
    -log p_t0 at the same points within 1% (the oracle of the tests above); config keys typed and range-checked."""
    import os

    from gradscore_train import evaluation
    from gradscore_train.config import ConfigError, load_config
    from gradscore_train.data import ToySource

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "toy", "l2.yaml"), ["eval.likelihood=true",
                                                                         "eval.likelihood_samples=64"])
    assert cfg.eval.likelihood and cfg.eval.likelihood_samples == 64
    assert load_config(os.path.join(root, "configs", "toy", "l2.yaml")).eval.likelihood is False   # off by default
    with pytest.raises(ConfigError, match="eval.likelihood_samples must be >= 1"):
        load_config(os.path.join(root, "configs", "toy", "l2.yaml"), ["eval.likelihood_samples=0"])
    source = ToySource(GaussianMixture.preset("pair"))
    out = evaluation.likelihood(source.mixture.score_fn(sde), sde, source, cfg.eval, seed=0)
    assert set(out) == {"quality/model_nll", "quality/model_nll_stderr", "quality/model_nll_target"}
    assert out["quality/model_nll"] == pytest.approx(out["quality/model_nll_target"], rel=0.01)
    assert out["quality/model_nll_stderr"] > 0


def test_driver_digits_bits_per_dim_and_report_column(sde):
    """evaluation.likelihood on the digits source (17 levels, x = k / 8 - 1, 64 dimensions: Hutchinson) with the
    exact score of N(0, s^2 I) as the model: the mean bits/dim equals the closed-form expectation over the
    dequantisation (E|x + U/8|^2 = |x|^2 + sum x / 8 + d / 192) within 0.01 bits (the isotropic Jacobian makes
    Rademacher probes exact; U's draw moves the mean by ~1e-3). Then the ablation report's image table
    gets the bits/dim column from final_metrics."""
    from gradscore_train import evaluation
    from gradscore_train.ablation.report import summary_rows
    from gradscore_train.config import DataConfig, EvalConfig
    from gradscore_train.data import load_digits_source

    source = load_digits_source(DataConfig(kind="digits", resolution=8))
    assert evaluation.likelihood_levels(source) == 17
    s2, d, n = 0.5, 64, 16
    mix = GaussianMixture(torch.zeros(1, d, dtype=torch.float64), s2 * torch.eye(d, dtype=torch.float64)[None])

    def score(x, t):                                   # images [B, 1, 8, 8] -> the mixture's [B, 64]
        return mix.score(x.reshape(x.shape[0], -1), t, sde).reshape(x.shape)

    out = evaluation.likelihood(score, sde, source, EvalConfig(likelihood=True, likelihood_samples=n), seed=0)
    x = source.sample_x0(n, generator=torch.Generator().manual_seed(0)).double().reshape(n, -1)
    t0 = torch.tensor(sde.t_min, dtype=torch.float64)
    v = sde.alpha(t0) ** 2 * s2 + sde.sigma(t0) ** 2
    e_sq = x.pow(2).sum(1) + x.sum(1) / 8 + d / 192
    expected = (0.5 * e_sq / v + 0.5 * d * torch.log(2 * math.pi * v) - d * math.log(1 / 8)) / (d * math.log(2))
    assert out["quality/bits_per_dim"] == pytest.approx(float(expected.mean()), abs=0.01)
    runs = [{"label": "l2", "run_id": "l2-s0", "final_metrics": {**out, "train/seconds_per_step": 0.1}}]
    (row,) = summary_rows(runs, "energy_distance")
    assert "quality/bits_per_dim" in row and "quality/bits_per_dim_stderr" not in row


def test_report_toy_model_nll_column():
    from gradscore_train.ablation.assessment import PREDICTORS
    from gradscore_train.ablation.report import summary_rows

    quality = {"energy_distance": 0.01, "energy_distance_floor": 0.002, "nll": 1.0}
    runs = [{"label": "l2", "run_id": f"l2-s{i}", "assessment": {"quality": quality,
                                                                  "predictors": {k: 0.0 for k in PREDICTORS}},
             "final_metrics": {"quality/model_nll": 1.5 + i}} for i in range(2)]
    (row,) = summary_rows(runs, "energy_distance")
    assert row["model_nll"].startswith("2 ±")
    del runs[0]["final_metrics"]["quality/model_nll"], runs[1]["final_metrics"]["quality/model_nll"]
    assert "model_nll" not in summary_rows(runs, "energy_distance")[0]


@pytest.mark.slow
def test_driver_run_reports_model_nll(tmp_path):
    """A 2-step toy run with eval.likelihood on: final_metrics holds the model NLL (a finite number)."""
    import json
    import os

    from gradscore_train.config import load_config
    from gradscore_train.loop import run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "toy", "l2.yaml"),
                      ["train.checkpoint_every=0", "train.warmup_steps=0", "eval.num_samples=16", "eval.sample_steps=2",
                       "eval.diag_samples=16", "eval.diag_times=[0.5]", "eval.quality=false", "train.batch_size=16",
                       "model.hidden=32", "model.depth=2", "eval.likelihood=true", "eval.likelihood_samples=16"])
    out = run(cfg, str(tmp_path), max_steps=2, progress=False)
    with open(tmp_path / "final_metrics.json") as f:
        saved = json.load(f)
    assert math.isfinite(out["quality/model_nll"]) and saved["quality/model_nll"] == out["quality/model_nll"]
    assert "quality/model_nll_target" in saved


def test_readme_likelihood_block_runs():
    """The README's likelihood block (Diagnostics section) runs as written, with fewer points."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Diagnostics", 1)[1].split("\n## ", 1)[0]
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "log_likelihood(" in b]
    code, n = re.subn(r"^num_points = .*$", "num_points = 16", code, flags=re.M)
    assert n == 1
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["nll"].shape == (16,) and torch.isfinite(ns["bpd"]).all()
