"""Samplers (docs/theory.md §3-4): with the exact score they reproduce the target, and the Heun ODE does not
notice a zero-effect (solenoidal) perturbation of the score. Also runs the README's training loop."""
import math
import pathlib
import re

import pytest
import torch
from diffusers import DDPMScheduler

from gradscore import energy_distance, sample
from gradscore.sde import VESDE, VPSDE, DiscreteVPSDE
from gradscore.toy import GaussianMixture, add_zero_effect, skew_matrix

F64 = torch.float64
N = 2000                       # samples per set
STEPS = 200                    # sampler steps


@pytest.fixture(scope="module")
def ring8_threshold():
    """Noise floor of the energy distance between two independent N-samples of ring8, from 10 pairs:
    threshold = mean + 4 std (measured: mean ~0.0018, std ~0.0007, so ~0.0046). For scale, a ring of radius
    2.1 instead of 2 sampled the same way scores ~0.008, radius 2.2 ~0.022 (both caught)."""
    gm = GaussianMixture.preset("ring8")
    g = torch.Generator().manual_seed(123)
    floor = torch.tensor([energy_distance(gm.sample(N, generator=g, dtype=F64), gm.sample(N, generator=g, dtype=F64))
                          for _ in range(10)])
    return float(floor.mean() + 4 * floor.std())


SDES = {"vp": VPSDE(), "ve": VESDE(0.01, 10.0), "discrete_vp": DiscreteVPSDE.from_scheduler(DDPMScheduler())}


@pytest.mark.parametrize("method", ["ode", "sde"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_exact_score_reproduces_the_mixture(method, sde_name, ring8_threshold):
    """Oracle: ring8 itself. Samples driven by the exact mixture score (200 steps) are within the two-sample
    noise floor of fresh target samples (energy distance < floor mean + 4 floor std)."""
    sde = SDES[sde_name]
    gm = GaussianMixture.preset("ring8")
    g = torch.Generator().manual_seed(1)
    x = sample(gm.score_fn(sde), sde, (N, 2), method=method, steps=STEPS, generator=g, dtype=F64)
    ed = energy_distance(x, gm.sample(N, generator=g, dtype=F64))
    assert ed < ring8_threshold, f"{sde_name}/{method}: energy distance {ed:.4g} >= threshold {ring8_threshold:.4g}"


def test_wrong_score_is_detected(ring8_threshold):
    """Negative control for the test above: the exact score of a ring of radius 2.2 does not pass as ring8."""
    sde = VPSDE()
    ang = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    wrong = GaussianMixture(2.2 * torch.stack([ang.cos(), ang.sin()], 1), 0.03 * torch.eye(2).expand(8, 2, 2))
    g = torch.Generator().manual_seed(1)
    x = sample(wrong.score_fn(sde), sde, (N, 2), method="ode", steps=STEPS, generator=g, dtype=F64)
    assert energy_distance(x, GaussianMixture.preset("ring8").sample(N, generator=g, dtype=F64)) > 2 * ring8_threshold


@pytest.mark.parametrize("c", [1.0, 2.0])
def test_heun_ode_ignores_zero_effect_perturbation_on_mixture(c, ring8_threshold):
    """docs/theory.md §3: s' = s + c J s has L2 error c^2 E|J s|^2 (large) but the same marginals, so the Heun ODE
    still reproduces ring8 within the noise floor. Control: a perturbation of the same size with a SYMMETRIC
    matrix (not zero-effect) is caught by orders of magnitude."""
    sde = VPSDE()
    gm = GaussianMixture.preset("ring8")
    g = torch.Generator().manual_seed(1)
    x = sample(add_zero_effect(gm.score_fn(sde), c), sde, (N, 2), method="ode", steps=STEPS, generator=g, dtype=F64)
    ed = energy_distance(x, gm.sample(N, generator=g, dtype=F64))
    assert ed < ring8_threshold, f"c={c}: energy distance {ed:.4g} >= {ring8_threshold:.4g}"
    S = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64)
    g = torch.Generator().manual_seed(1)
    x = sample(lambda x, t: gm.score(x, t, sde) @ (torch.eye(2, dtype=F64) + c * S).T, sde, (N, 2),
               method="ode", steps=STEPS, generator=g, dtype=F64)
    assert energy_distance(x, gm.sample(N, generator=g, dtype=F64)) > 100 * ring8_threshold


def test_heun_ode_zero_effect_is_a_pure_rotation():
    """Pathwise oracle: for an isotropic Gaussian N(0, v I) the probability-flow ODE is dx/dt = A(t) x with
    A = a(t) I + b(t) J, b = c g^2 / (2 C_t), C_t = alpha_t^2 v + sigma_t^2. a(t) does not depend on c and I, J commute,
    so in exact arithmetic the c = 2 endpoint is the c = 0 endpoint rotated: same radius for every sample.
    Tolerance from the step size: Heun's local error on z = h lambda (|lambda| = |a + i b|) is |z|^3 / 6 per step,
    so the relative radius mismatch of the two runs is below sum_i |z_i|^3 / 3 (~0.018 at 200 steps; measured 3e-4).
    Control (docs/theory.md §3 caveat): an explicit Euler step would inflate the radius by
    prod_i sqrt(1 + h^2 b_i^2) - 1, which is larger than that tolerance, so the check is sharp enough to tell the
    schemes apart."""
    sde, v, c = VPSDE(), 0.5, 2.0
    gm = GaussianMixture(torch.zeros(1, 2, dtype=F64), v * torch.eye(2, dtype=F64)[None])
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sample((500, 2), generator=g, dtype=F64)
    plain = sample(gm.score_fn(sde), sde, (500, 2), method="ode", steps=STEPS, x_T=x_T)
    rotated = sample(add_zero_effect(gm.score_fn(sde), c), sde, (500, 2), method="ode", steps=STEPS, x_T=x_T)

    ts = torch.linspace(1, sde.t_min, STEPS + 1, dtype=F64)[:-1]
    h = (1 - sde.t_min) / STEPS
    C = sde.alpha(ts) ** 2 * v + sde.sigma(ts) ** 2
    a = sde.drift_coef(ts) + 0.5 * sde.g2(ts) / C
    b = c * sde.g2(ts) / (2 * C)
    tol = float(((h * (a**2 + b**2).sqrt()) ** 3).sum() / 3)
    euler_inflation = float(torch.sqrt(1 + (h * b) ** 2).prod() - 1)
    assert euler_inflation > 2 * tol

    ratio = rotated.norm(dim=1) / plain.norm(dim=1)
    assert (ratio - 1).abs().max() < tol
    angle = torch.atan2(rotated[:, 1], rotated[:, 0]) - torch.atan2(plain[:, 1], plain[:, 0])
    assert angle.remainder(2 * math.pi).min() > 0.5            # the perturbation really rotated every sample
    J = skew_matrix(2, dtype=F64)
    assert (plain @ J.T).norm() > 0                            # (J is not the zero matrix)


def test_sampler_api(gen):
    """Trajectory length, x_T respected, generator makes it reproducible, errors name the argument."""
    sde = VPSDE()
    gm = GaussianMixture.preset("pair")
    x, traj = sample(gm.score_fn(sde), sde, (8, 2), steps=5, generator=torch.Generator().manual_seed(0),
                     return_trajectory=True, progress=True)
    assert x.shape == (8, 2) and len(traj) == 6 and torch.equal(traj[-1], x)
    x2 = sample(gm.score_fn(sde), sde, (8, 2), steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x2)
    x_T = torch.randn(8, 2, generator=gen)
    _, traj = sample(gm.score_fn(sde), sde, (8, 2), method="ode", steps=3, x_T=x_T, return_trajectory=True)
    assert torch.equal(traj[0], x_T)
    with pytest.raises(ValueError, match="method"):
        sample(gm.score_fn(sde), sde, (8, 2), method="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(gm.score_fn(sde), sde, (8, 2), steps=0)


def _readme_loop_code():
    """The first ```python block under the README heading "Use it in your own PyTorch loop"."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use it in your own PyTorch loop", 1)
    assert len(section) == 2, "README.md lost its 'Use it in your own PyTorch loop' section"
    match = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert match, "no ```python block in the README's loop section"
    return match.group(1)


def test_readme_training_loop_runs():
    """The README's plain-PyTorch loop runs as written, with its step counts made small (the snippet defines
    `train_steps` and `sample_steps`; they are replaced here, and the replacement must happen)."""
    code = _readme_loop_code()
    code, n1 = re.subn(r"^train_steps = \d+", "train_steps = 20", code, flags=re.M)
    code, n2 = re.subn(r"^sample_steps = \d+", "sample_steps = 10", code, flags=re.M)
    assert n1 == 1 and n2 == 1, "the README snippet must define train_steps and sample_steps on their own lines"
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    for name in ("samples", "energy_samples"):
        assert name in namespace and torch.isfinite(namespace[name]).all()


def test_reverse_sde_step_is_euler_maruyama():
    """Oracle: the Euler-Maruyama formula written out for the VP process (f = -beta x / 2, g^2 = beta,
    beta linear) with the exact score of a Gaussian N(0, v I); float64 rounding (1e-12). ``noise=None`` is
    the drift-only step, and ``sample(method="sde")`` is exactly a chain of these steps (same draws)."""
    from gradscore.sampling import reverse_sde_step

    sde, v = VPSDE(0.1, 20.0), 0.5
    score = GaussianMixture(torch.zeros(1, 3), v * torch.eye(3)[None]).score_fn(sde)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t, h = 0.6, -0.01
    beta = 0.1 + t * (20.0 - 0.1)
    var_t = float(sde.alpha(torch.tensor(t, dtype=F64))) ** 2 * v + float(sde.sigma(torch.tensor(t, dtype=F64))) ** 2
    drift_only = x + h * (-0.5 * beta * x - beta * (-x / var_t))
    torch.testing.assert_close(reverse_sde_step(score, sde, x, t, h, None), drift_only, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse_sde_step(score, sde, x, torch.full((5,), t, dtype=F64), h, z),
                               drift_only + math.sqrt(-h * beta) * z, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="h must be negative"):
        reverse_sde_step(score, sde, x, t, 0.01, z)
    with pytest.raises(ValueError, match="noise has shape"):
        reverse_sde_step(score, sde, x, t, h, z[:, :2])

    steps, x_T = 4, torch.randn(5, 3, generator=g, dtype=F64)
    g_chain, ts = torch.Generator().manual_seed(7), torch.linspace(1.0, sde.t_min, steps + 1, dtype=F64)
    chain = x_T
    for i in range(steps):
        noise = None if i == steps - 1 else torch.randn(chain.shape, generator=g_chain, dtype=F64)
        chain = reverse_sde_step(score, sde, chain, float(ts[i]), float(ts[i + 1] - ts[i]), noise)
    sampled = sample(score, sde, (5, 3), method="sde", steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(7),
                     dtype=F64)
    assert torch.equal(sampled, chain)
