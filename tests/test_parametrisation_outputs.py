"""Parametrisations and loss scales (docs/theory.md §7.1, §9.3, §9.4): exact conditional scores through
``ScoreModel`` outputs eps / x0 / v / edm, the v and EDM losses in their own variables, min-SNR-gamma, EDM's
process, ``reduction``, ``EnergyScore(energy="auto")``, the image critic and the time-unit rule."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscore as gs
from gradscore.parametrisation import edm_coefficients, resolve_time_input
from gradscore.sde import broadcast_to
from gradscore.toy import ConditionalGaussianMixture

F64 = torch.float64


class ExactBackbone(nn.Module):
    """The exact eps / x0 / v / EDM-F prediction built from an exact conditional score ``score(x, t, class_labels)``,
    by the definitions (x_t = a x0 + s eps): eps = -s score, x0 = (x + s^2 score) / a, v = a eps - s x0. For "edm"
    (under EDMSDE, a = 1) the input is (c_in x, c_noise): sigma = exp(4 c_noise), t from sigma, D = x + sigma^2 score,
    F = (D - c_skip x) / c_out."""

    def __init__(self, score, sde, kind):
        super().__init__()
        self.score, self.sde, self.kind = score, sde, kind

    def forward(self, x, t, class_labels):
        if self.kind == "edm":
            sigma = torch.exp(4 * t)
            c_skip, c_out, c_in, _ = (broadcast_to(c, x) for c in edm_coefficients(sigma, self.sde.sigma_data))
            x = x / c_in
            tt = torch.log(sigma / self.sde.sigma_min) / math.log(self.sde.sigma_max / self.sde.sigma_min)
            D = x + broadcast_to(sigma, x) ** 2 * self.score(x, tt, class_labels)
            return (D - c_skip * x) / c_out
        a, s = broadcast_to(self.sde.alpha(t), x), broadcast_to(self.sde.sigma(t), x)
        score = self.score(x, t, class_labels)
        eps, x0 = -s * score, (x + s**2 * score) / a
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.kind]


@pytest.mark.parametrize("sde", [gs.VPSDE(), gs.EDMSDE()], ids=["vp", "edm"])
def test_exact_conditional_score_round_trips_through_every_output(sde, gen):
    """Acceptance oracle: ScoreModel(ExactBackbone(kind), output=kind) returns the exact conditional score to 1e-5
    (float64: the round trip only rounds, ~1e-12; 1e-5 is the stated bound), for eps, x0, v (both processes) and
    edm (EDM's VE process)."""
    target = ConditionalGaussianMixture.preset("three_shapes")
    exact = target.score_fn(sde)
    x = 1.5 * torch.randn(30, 2, generator=gen, dtype=F64)
    t = torch.rand(30, generator=gen, dtype=F64) * 0.9 + 0.05
    y = torch.arange(30) % 3
    kinds = ["eps", "x0", "v"] + (["edm"] if isinstance(sde, gs.EDMSDE) else [])
    for kind in kinds:
        model = gs.ScoreModel(ExactBackbone(exact, sde, kind), sde, output=kind)
        torch.testing.assert_close(model(x, t, class_labels=y), exact(x, t, y), rtol=1e-5, atol=1e-5)


def test_v_loss_is_dsm_with_weight_sigma2_over_alpha2(gen):
    """docs/theory.md §9.3: eps_hat - eps = alpha (v_hat - v) under VP, so DSM with lambda = sigma^2 / alpha^2 on
    ScoreModel(output="v") is |v_hat - v|^2 per sample, v = alpha eps - sigma x0 (float64, rounding)."""
    sde, backbone = gs.VPSDE(), gs.TimeMLP(3, 16, 2).double()
    model = gs.ScoreModel(backbone, sde, output="v")
    x0, eps = torch.randn(16, 3, generator=gen, dtype=F64), torch.randn(16, 3, generator=gen, dtype=F64)
    t = torch.rand(16, generator=gen, dtype=F64) * 0.98 + 0.01
    loss = gs.DSMLoss(sde, weighting=lambda sde, t: sde.sigma(t) ** 2 / sde.alpha(t) ** 2)(model, x0, t=t, noise=eps)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    v_hat = backbone(a * x0 + s * eps, t)
    torch.testing.assert_close(loss, (v_hat - (a * eps - s * x0)).pow(2).sum(1), rtol=1e-10, atol=1e-10)


def test_edm_loss_is_unit_weight_on_F(gen):
    """docs/theory.md §7.1: under EDMSDE, weighting="edm" on ScoreModel(output="edm") is |F - F_target|^2 per sample,
    F_target = (x0 - c_skip x) / c_out (EDM's lambda c_out^2 = 1), float64 rounding."""
    sde = gs.EDMSDE()
    backbone = gs.TimeMLP(2, 16, 2).double()
    model = gs.ScoreModel(backbone, sde, output="edm")
    x0, eps = torch.randn(16, 2, generator=gen, dtype=F64), torch.randn(16, 2, generator=gen, dtype=F64)
    t = sde.sample_time(16, generator=gen, dtype=F64)
    loss = gs.DSMLoss(sde, weighting="edm")(model, x0, t=t, noise=eps)
    sigma = sde.sigma(t)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.5)
    x = x0 + sigma[:, None] * eps
    F_hat = backbone(c_in[:, None] * x, c_noise)
    target = (x0 - c_skip[:, None] * x) / c_out[:, None]
    torch.testing.assert_close(loss, (F_hat - target).pow(2).sum(1), rtol=1e-9, atol=1e-10)


def test_edm_times_are_lognormal_noise_levels(gen):
    """EDMSDE.sample_time: log sigma_t ~ N(-1.2, 1.2^2) restricted to [log 0.002, log 80] (the truncation removes
    < 1e-4 of the mass). 100000 draws: mean and standard deviation within 5 standard errors, every time in [0, 1];
    timestep is c_noise = log(sigma) / 4."""
    sde = gs.EDMSDE()
    t = sde.sample_time(100000, generator=gen, dtype=F64)
    assert 0 <= t.min() and t.max() <= 1
    log_sigma = sde.sigma(t).log()
    n = t.numel()
    assert abs(log_sigma.mean() - (-1.2)) < 5 * 1.2 / math.sqrt(n)
    assert abs(log_sigma.std() - 1.2) < 5 * 1.2 / math.sqrt(2 * n)
    torch.testing.assert_close(sde.timestep(t), log_sigma / 4)


def test_min_snr_weighting_is_the_min_snr_x0_loss(gen):
    """Hang et al. 2023 weight the x0 loss by min(SNR_t, gamma); docs/theory.md §7.1 translates it to
    lambda = sigma^2 min(1, gamma / SNR). DSM with weighting="min_snr" (gamma = 5) equals
    min(SNR, 5) |x0_hat - x0|^2 per sample, x0_hat = (x_t + sigma^2 s) / alpha (float64 rounding)."""
    sde, backbone = gs.VPSDE(), gs.TimeMLP(2, 16, 2).double()
    model = gs.ScoreModel(backbone, sde)
    x0, eps = torch.randn(32, 2, generator=gen, dtype=F64), torch.randn(32, 2, generator=gen, dtype=F64)
    t = torch.linspace(0.01, 0.99, 32, dtype=F64)                       # SNR from ~1e3 down to ~1e-4: both branches
    loss = gs.DSMLoss(sde, weighting="min_snr")(model, x0, t=t, noise=eps)
    a, s = sde.alpha(t), sde.sigma(t)
    xt = a[:, None] * x0 + s[:, None] * eps
    x0_hat = (xt + s[:, None] ** 2 * model(xt, t)) / a[:, None]
    expected = torch.clamp(a**2 / s**2, max=5.0) * (x0_hat - x0).pow(2).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(gs.OBJECTIVES))
def test_reduction_mean_is_the_sum_over_d(name, gen):
    """reduction="mean" divides every per-sample loss by d = 3 * 4 * 4 (same times, noise, probes and weights:
    exact up to rounding), and for l2 with eps-prediction it is F.mse_loss(eps_hat, eps) per sample."""
    sde = gs.VPSDE()
    spec = gs.OBJECTIVES[name]
    x0 = torch.randn(4, 3, 4, 4, generator=gen, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)

    def backbone(x, tt):
        return torch.sin(x) * (1 + broadcast_to(tt, x)) + 0.3 * x.flip(-1)

    class Conv(nn.Module):
        def forward(self, x, tt):
            return backbone(x, tt)

    model = gs.EnergyScore(Conv(), sde) if spec.parametrisation == "energy" else gs.ScoreModel(Conv(), sde)
    critic = gs.Critic(Conv(), sde, potential="inner") if spec.needs_critic else None
    losses = {}
    for reduction in ("sum", "mean"):
        obj = gs.build_objective(name, sde, critic=critic, reduction=reduction)
        extra = {"probe_vectors": torch.ones(1, *x0.shape, dtype=F64)} if name == "asymmetry" else {}
        losses[reduction] = obj(model, x0, t=t, noise=noise, **extra)
    torch.testing.assert_close(losses["mean"], losses["sum"] / 48, rtol=1e-12, atol=0)
    if name == "l2":
        eps_hat = backbone(sde.alpha(t)[:, None, None, None] * x0 + sde.sigma(t)[:, None, None, None] * noise, t)
        torch.testing.assert_close(losses["mean"], F.mse_loss(eps_hat, noise, reduction="none").mean((1, 2, 3)))
    with pytest.raises(ValueError, match="reduction must be one of \\['sum', 'mean'\\]"):
        gs.build_objective(name, sde, critic=critic, reduction="avg")


def test_energy_auto_takes_scalar_outputs_as_the_energy_and_x_shaped_ones_through_the_inner_product(gen):
    """energy="auto" (the default) equals "scalar" for a [B] backbone and "inner" for a backbone shaped like x
    (same weights, float64: identical); any other shape raises naming both expectations."""
    sde = gs.VPSDE()
    x, t = torch.randn(6, 2, generator=gen, dtype=F64), torch.full((6,), 0.4, dtype=F64)
    scalar, vector = gs.TimeMLP(2, 8, 1, out_dim=1).double(), gs.TimeMLP(2, 8, 1).double()
    assert gs.EnergyScore(scalar, sde).energy_name == "auto"
    torch.testing.assert_close(gs.EnergyScore(scalar, sde)(x, t), gs.EnergyScore(scalar, sde, "scalar")(x, t))
    torch.testing.assert_close(gs.EnergyScore(vector, sde)(x, t), gs.EnergyScore(vector, sde, "inner")(x, t))
    with pytest.raises(ValueError, match=r"shaped like x \(6, 2\).*one scalar per sample.*\(6, 3\)"):
        gs.EnergyScore(gs.TimeMLP(2, 8, 1, out_dim=3).double(), sde)(x, t)


# ------------------------------------------------------------------------------------------ time units
def tiny_unet(**extra):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                       **extra)


def test_time_input_auto_is_explicit_about_wrapped_diffusers_models(gen):
    """A diffusers model at the top level gets sde.timestep(t) (hundreds), a wrapper of one raises under "auto"
    naming the unit choices, a wrapper that declares its unit (attribute or argument) gets what it declares (the
    timesteps that reach the inner UNet are recorded), and a module without diffusers inside gets t."""
    sde = gs.DiscreteVPSDE.from_scheduler(__import__("diffusers").DDPMScheduler())
    unet, seen = tiny_unet(), []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([0.29, 0.98])

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, time):
            return self.inner(x, time).sample

    gs.ScoreModel(unet, sde)(x, t)
    torch.testing.assert_close(seen[-1], sde.timestep(t))               # 289.7, 979.0
    with pytest.raises(ValueError, match="wraps the diffusers model UNet2DModel.*time_input='t'.*'timestep'"):
        gs.ScoreModel(Wrapper(unet), sde)
    with pytest.raises(ValueError, match="wraps the diffusers model"):
        gs.Critic(Wrapper(unet), sde, potential="inner")
    gs.ScoreModel(Wrapper(unet), sde, time_input="timestep")(x, t)
    torch.testing.assert_close(seen[-1], sde.timestep(t))
    declared = Wrapper(unet)
    declared.time_input = "t"                                            # the user's module converts t itself
    assert resolve_time_input(declared) == "t"
    gs.ScoreModel(declared, sde)(x, t)
    torch.testing.assert_close(seen[-1], t)
    assert resolve_time_input(gs.TimeMLP(2)) == "t" and resolve_time_input(lambda x, t: x) == "t"
    with pytest.raises(ValueError, match="time_input must be one of"):
        resolve_time_input(unet, "steps")


# ------------------------------------------------------------------------------------------ image critic
def test_image_critic_is_the_gradient_of_its_potential_and_trains_dual_sobolev_on_8x8_images(gen):
    """Critic(UNet2DModel, potential="inner"): psi = <x, f(x, t)> / (2 sigma_t). Its forward equals the central
    difference of psi along a random direction (float64, h = 1e-5: error ~h^2, tolerance 1e-6 relative), and
    dual_sobolev with this critic and a conditional UNet score model (class_labels) trains 3 steps."""
    sde = gs.DiscreteVPSDE.from_scheduler(__import__("diffusers").DDPMScheduler())
    critic = gs.Critic(tiny_unet().double(), sde, potential="inner")
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64)
    t = torch.tensor([0.3, 0.7], dtype=F64)
    v = torch.randn(x.shape, generator=gen, dtype=F64)
    h = 1e-5
    with torch.no_grad():
        fd = (critic.potential(x + h * v, t) - critic.potential(x - h * v, t)) / (2 * h)
    directional = (critic(x, t) * v).flatten(1).sum(1)
    torch.testing.assert_close(directional, fd, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="potential='inner'"):
        gs.Critic(tiny_unet().double(), sde)(x, t)

    model = gs.ScoreModel(tiny_unet(num_class_embeds=11), sde)
    critic = gs.Critic(tiny_unet(num_class_embeds=11), sde, potential="inner")     # the critic gets the labels too
    objective = gs.build_objective("dual_sobolev", sde, critic=critic, n_critic=2)
    opt = torch.optim.Adam([*model.parameters(), *critic.parameters()], lr=1e-3)
    x0, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    before = [p.detach().clone() for p in critic.parameters()]
    for _ in range(3):
        assert torch.isfinite(gs.train_step(objective, model, x0, opt, class_labels=y))
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.parameters()))
