"""gradscore.sample(..., scheduler=) with diffusers schedulers, and x0 clipping (gradscore/schedulers.py)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import gradscore as gs
from gradscore.schedulers import check_schedule, score_to_prediction, step_schedule, time_of_alpha2
from gradscore.toy import GaussianMixture

BASE = DDPMScheduler(clip_sample=False)
SDE = gs.DiscreteVPSDE.from_scheduler(BASE)
N, CHUNKS = 1000, 8


def mean_distance(x, refs):
    """Mean energy distance of the CHUNKS slices of ``x`` to the CHUNKS reference samples."""
    return sum(gs.energy_distance(c, r) for c, r in zip(x.chunk(CHUNKS), refs)) / CHUNKS


@pytest.fixture(scope="module")
def ring():
    """ring8, CHUNKS reference samples of N points and the two-sample floor, the mean energy distance of CHUNKS
    independent pairs of target samples. Averages, because one pair's distance varies by 10x
    (a ratio of two single draws is not a test)."""
    mix = GaussianMixture.preset("ring8")
    g = torch.Generator().manual_seed(11)
    refs = [mix.sample(N, generator=g) for _ in range(CHUNKS)]
    floor = mean_distance(mix.sample(N * CHUNKS, generator=g), refs)
    return mix, refs, floor


@pytest.mark.parametrize("cls,steps", [(DDIMScheduler, 100), (DPMSolverMultistepScheduler, 25),
                                       (EulerDiscreteScheduler, 50)])
def test_schedulers_driven_by_exact_score_reproduce_the_mixture(ring, cls, steps):
    # Oracle: the exact score of the mixture; a correct conversion to the scheduler's prediction reproduces p_0 up to
    # the discretisation, which is below the sampling noise here (DDIM 100 steps = DDIM 1000 steps = Heun ODE 200
    # steps to 4 digits). Tolerance: 3x the two-sample floor (measured ratios 0.83-1.21 over 3 seeds;
    # docs/engineering.md, "diffusers interop").
    mix, refs, floor = ring
    x = gs.sample(mix.score_fn(SDE), SDE, (N * CHUNKS, 2), scheduler=cls.from_config(BASE.config), steps=steps,
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert mean_distance(x, refs) < 3 * floor


def test_clip_sample_default_is_the_pitfall(ring):
    # DDPMScheduler()'s config has clip_sample=True: x0 clamped to [-1, 1] squeezes the radius-2 ring. The same run
    # as above must then fail the test's criterion (this is what the criterion can detect).
    mix, refs, floor = ring
    sched = DDIMScheduler.from_config(DDPMScheduler().config)
    assert sched.config.clip_sample
    x = gs.sample(mix.score_fn(SDE), SDE, (N, 2), scheduler=sched, steps=50, generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 + 1e-6
    assert gs.energy_distance(x, refs[0]) > 10 * floor


def test_score_to_prediction_recovers_eps_x0_v():
    # Oracle: the conditional score -(x - alpha x0) / sigma^2 = -eps / sigma of a known (x0, eps) gives back
    # eps, x0 and v = alpha eps - sigma x0 exactly (float64 round-off, 1e-12).
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    alpha, sigma = 0.6, 0.8
    x = alpha * x0 + sigma * eps
    s = -(x - alpha * x0) / sigma**2
    assert torch.allclose(score_to_prediction(s, x, alpha, sigma, "epsilon"), eps, atol=1e-12)
    assert torch.allclose(score_to_prediction(s, x, alpha, sigma, "sample"), x0, atol=1e-12)
    assert torch.allclose(score_to_prediction(s, x, alpha, sigma, "v_prediction"), alpha * eps - sigma * x0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type"):
        score_to_prediction(s, x, alpha, sigma, "flow")


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_prediction_types_give_the_same_ddim_samples(prediction_type):
    # DDIM's update depends only on (x0, eps), which every prediction type encodes: the samples of one score
    # must agree across prediction types to float32 round-off (1e-4 on values of size ~2 after 50 steps).
    mix = GaussianMixture.preset("pair")
    run = lambda sched: gs.sample(mix.score_fn(SDE), SDE, (256, 2), scheduler=sched, steps=50,  # noqa: E731
                                  generator=torch.Generator().manual_seed(3))
    ref = run(DDIMScheduler.from_config(BASE.config))
    other = run(DDIMScheduler.from_config(BASE.config, prediction_type=prediction_type))
    assert (ref - other).abs().max() < 1e-4


def test_euler_steps_are_placed_by_their_sigmas():
    # EulerDiscrete has fractional timesteps with sigma_E interpolated linearly: the network input is x / sqrt(1 +
    # sigma_E^2) and must be scored at the time where the process has alpha^2 = 1 / (1 + sigma_E^2) (bisection to
    # 1e-12), which differs from timestep / 999 between integer steps.
    sched = EulerDiscreteScheduler.from_config(BASE.config)
    sched.set_timesteps(25)
    sched_times = step_schedule(sched, SDE)
    sig = sched.sigmas.double()
    assert any(abs(float(k) - round(float(k))) > 0.1 for k in sched.timesteps)
    for (t, alpha, sigma), s_e in zip(sched_times, sig):
        assert abs(alpha - float((1 + s_e**2) ** -0.5)) < 1e-12
        # the scheduler's sigmas are float32: the first one lies a relative ~1e-7 beyond alpha_1 (bisection stops at 1)
        assert abs(float(SDE.alpha(torch.tensor(t, dtype=torch.float64))) / alpha - 1) < 1e-6
        assert abs(alpha**2 + sigma**2 - 1) < 1e-12
    ddpm = DDPMScheduler.from_config(BASE.config)
    ddpm.set_timesteps(10)
    assert [t for t, _, _ in step_schedule(ddpm, SDE)] == [float(k) / 999 for k in ddpm.timesteps]
    k = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.allclose(time_of_alpha2(SDE, SDE.alphas_cumprod[k.long()]), k / 999.0, atol=1e-9)


def test_sde_must_match_the_scheduler():
    # A continuous VPSDE only approximates DDPM's linear schedule; another beta range or another N is a different
    # process. Each raises naming the mismatch; from_scheduler passes.
    check_schedule(SDE, BASE)
    with pytest.raises(ValueError, match="does not match DDIMScheduler's schedule"):
        gs.sample(lambda x, t: -x, gs.VPSDE(), (4, 2), scheduler=DDIMScheduler.from_config(BASE.config), steps=5)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        check_schedule(SDE, DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        check_schedule(SDE, DDPMScheduler(num_train_timesteps=500))
    with pytest.raises(TypeError, match="no alphas_cumprod"):
        check_schedule(SDE, object())
    with pytest.raises(ValueError, match="t_min"):
        gs.sample(lambda x, t: -x, SDE, (4, 2), scheduler=BASE, steps=5, t_min=0.01)


def test_clip_x0_is_ddpm_clip_sample():
    # DDPM's clip_sample clamps its x0 prediction, and its posterior mean depends on x0 and x_t only; clip_x0 clamps
    # the score's x0 prediction. DDPM(clip_sample=True) on the raw score must equal DDPM(clip_sample=False) on
    # clip_x0=(-1, 1), noise included (same generator; float32, 1e-5). (DDIM's clip_sample keeps the unclipped eps in
    # its direction term unless step(use_clipped_model_output=True), so it is not the same map.)
    mix = GaussianMixture.preset("ring8")

    def run(clip_sample, clip_x0):
        return gs.sample(mix.score_fn(SDE), SDE, (512, 2), steps=40, clip_x0=clip_x0,
                         scheduler=DDPMScheduler.from_config(BASE.config, clip_sample=clip_sample),
                         generator=torch.Generator().manual_seed(5))

    a, b, free = run(True, None), run(False, (-1, 1)), run(False, None)
    assert (a - free).abs().max() > 0.5                  # the clipping acts (the ring has radius 2)
    assert (a - b).abs().max() < 1e-5


def test_clip_x0_keeps_the_ode_in_range():
    # A score whose data lie at +-4 (an image model that left [-1, 1]): the probability-flow ODE ends near +-4; with
    # clip_x0=(-1, 1) its x0 prediction is in range at every step, so the end point x = alpha x0' + sigma eps' is
    # within sigma_{t_min} (0.01 here) times a few of [-1, 1].
    mix = GaussianMixture([[-4.0, 0.0], [4.0, 0.0]], 0.05 * torch.eye(2).expand(2, 2, 2))
    sde = gs.VPSDE()
    kw = dict(method="ode", steps=100, generator=torch.Generator().manual_seed(0))
    free = gs.sample(mix.score_fn(sde), sde, (256, 2), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    clipped = gs.sample(mix.score_fn(sde), sde, (256, 2), clip_x0=(-1, 1), **kw)
    assert free.abs().max() > 3.5
    assert clipped.abs().max() < 1.05
    with pytest.raises(ValueError, match="low < high"):
        gs.sample(mix.score_fn(sde), sde, (4, 2), clip_x0=(1, -1), steps=2)


class GaussianEnergyBackbone(torch.nn.Module):
    """f(x, t) = x sigma_t / (alpha_t^2 c^2 + sigma_t^2), so EnergyScore(energy="inner") has E = |x|^2 / (2 (alpha_t^2
    c^2 + sigma_t^2)) and score -x / (alpha_t^2 c^2 + sigma_t^2): the exact score of p_0 = N(0, c^2 I)."""

    def __init__(self, sde, c):
        super().__init__()
        self.sde, self.c, self.w = sde, c, torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        a, s = self.sde.alpha(t).to(x.dtype), self.sde.sigma(t).to(x.dtype)
        return self.w * x * (s / (a**2 * self.c**2 + s**2))[:, None]


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_energy_model_drives_schedulers(cls):
    # Oracle: an EnergyScore whose gradient is the exact score of N(0, c^2 I) must sample what the closed-form score
    # samples from the same noise (float32 round-off of the input gradient, 1e-4 on values of size ~1.5).
    c = 1.5
    energy = gs.EnergyScore(GaussianEnergyBackbone(SDE, c), SDE, energy="inner", time_input="t")
    exact = lambda x, t: -x / (SDE.alpha(t).to(x.dtype) ** 2 * c**2 + SDE.sigma(t).to(x.dtype) ** 2)[:, None]  # noqa: E731
    run = lambda f: gs.sample(f, SDE, (256, 2), scheduler=cls.from_config(BASE.config), steps=30,  # noqa: E731
                              generator=torch.Generator().manual_seed(2))
    a, b = run(energy), run(exact)
    assert (a - b).abs().max() < 1e-4
    assert abs(float(a.std()) - c) < 0.2                  # and it is N(0, c^2): std within sampling noise of 256 x 2
