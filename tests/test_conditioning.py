"""Conditioning (docs/theory.md §8.7, §9.5): the class-conditional toy and its exact scores, conditioning
keywords through every objective, the critic and the samplers, classifier-free guidance, the critic's
data-parallel check and ``objectives.prepare``."""
import math

import pytest
import torch
from torch import nn

import gradscore as gs
from gradscore.objectives.base import check_critic_prepared
from gradscore.sampling import guided_score
from gradscore.toy import ConditionalGaussianMixture, GaussianMixture

F64 = torch.float64


def single_gaussians(gen):
    """Three labels, each one Gaussian N(mu_y, Sigma_y) in R^2 (the closed form of DSM needs Gaussians)."""
    mixtures = []
    for _ in range(3):
        A = torch.randn(2, 2, generator=gen, dtype=F64)
        mixtures.append(GaussianMixture(2 * torch.randn(1, 2, generator=gen, dtype=F64),
                                        (A @ A.T / 2 + 0.1 * torch.eye(2, dtype=F64))[None]))
    return ConditionalGaussianMixture(mixtures, [0.5, 0.3, 0.2])


# ------------------------------------------------------------------------------------------ the toy
def test_conditional_score_is_the_gradient_of_the_conditional_log_density(gen):
    """Per label (null label: the marginal mixture), the score equals autograd of log p_t(x | y) at per-sample
    times; float64 autograd against a closed form: rounding only, 1e-10."""
    target, sde = ConditionalGaussianMixture.preset("ring8_pairs"), gs.VPSDE()
    x = torch.randn(40, 2, generator=gen, dtype=F64).requires_grad_(True)
    t = torch.rand(40, generator=gen, dtype=F64) * 0.9 + 0.05
    y = torch.arange(40) % (target.num_labels + 1)                      # every label and the null label
    logp = target.log_prob(x, t, sde, class_labels=y)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(target.score(x.detach(), t, sde, class_labels=y), grad, rtol=1e-10, atol=1e-10)
    null = y == target.null_label
    torch.testing.assert_close(target.score(x.detach()[null], t[null], sde, class_labels=y[null]),
                               target.marginal().score(x.detach()[null], t[null], sde))
    with pytest.raises(ValueError, match="class_labels must lie in 0..4"):
        target.score(x.detach(), t, sde, class_labels=torch.full((40,), 5))


def test_dsm_at_the_exact_conditional_score_equals_its_closed_form(gen):
    """Oracle (docs/theory.md §7.1 per label): at the exact conditional score of N(mu_y, Sigma_y) and fixed t,
    E[loss | y] = lambda(t) (d / sigma_t^2 - tr C_y^-1), C_y = alpha_t^2 Sigma_y + sigma_t^2 I. Monte Carlo with
    30000 samples (labels drawn), each label's mean within 5 of its own standard errors."""
    target, sde, t = single_gaussians(gen), gs.VPSDE(), 0.3
    x0, y = target.sample(30000, generator=gen, dtype=F64)
    loss = gs.DSMLoss(sde, weighting="sigma2")(target.score_fn(sde), x0, t=t, generator=gen, class_labels=y)
    a, s = float(sde.alpha(torch.tensor(t))), float(sde.sigma(torch.tensor(t)))
    for label, g in enumerate(target.mixtures):
        C = a**2 * g.covs[0] + s**2 * torch.eye(2, dtype=F64)
        expected = s**2 * (2 / s**2 - torch.linalg.inv(C).trace().item())
        values = loss[y == label]
        mean, se = values.mean().item(), values.std().item() / math.sqrt(values.numel())
        assert abs(mean - expected) < 5 * se, (label, mean, expected, se)
    # the condition matters: another label's score gives a larger loss (the L2 error between the two scores)
    wrong = gs.DSMLoss(sde)(target.score_fn(sde), x0, t=t, generator=gen, class_labels=(y + 1) % 3)
    assert wrong.mean() > loss.mean() + 0.5


def test_probability_flow_ode_per_label_reproduces_that_labels_mixture(gen):
    """The exact conditional score through the Heun ODE (200 steps, float64), 1500 points per label, against fresh
    samples of that label's mixture. The two-sample floor of each label is the mean energy distance of 8 independent
    pairs of exact samples. The energy distance of a single pair is a heavy-tailed statistic (the mode counts of a
    two-component label dominate it; 8 seeds x 4 labels of exact pairs reached 2.96x their mean), so the check is
    on the pooled ratio sum_y ED_y / sum_y floor_y < 3, and per label < 6. Against the next label's mixture every
    label is far above its floor (the condition reaches the sampler)."""
    target, sde, n = ConditionalGaussianMixture.preset("ring8_pairs"), gs.VPSDE(), 1500
    y = torch.arange(target.num_labels).repeat_interleave(n)
    x = gs.sample(target.score_fn(sde), sde, (y.numel(), 2), method="ode", steps=200, generator=gen, dtype=F64,
                  class_labels=y)
    ours, floors = [], []
    for label, mixture in enumerate(target.mixtures):
        floors.append(sum(gs.energy_distance(mixture.sample(n, generator=gen), mixture.sample(n, generator=gen))
                          for _ in range(8)) / 8)
        ours.append(gs.energy_distance(x[y == label], mixture.sample(n, generator=gen)))
        other = gs.energy_distance(x[y == label], target.mixtures[(label + 1) % 4].sample(n, generator=gen))
        assert ours[-1] < 6 * floors[-1] and other > 30 * floors[-1], (label, ours[-1], other, floors[-1])
    assert sum(ours) < 3 * sum(floors), (ours, floors)


def test_guidance_with_w_zero_is_the_conditional_sampler_exactly(gen):
    """w = 0: (1 + 0) s(x | c) - 0 s(x | null) is s(x | c) bit for bit, so the SDE sampler with the same seed
    returns the same tensor (torch.equal). w = 2 gives the guided field of the exact scores, (1 + w) s_c - w s_null,
    where s_null is the marginal mixture's score (a closed-form check of guided_score, float64 rounding)."""
    target, sde = ConditionalGaussianMixture.preset("ring8_pairs"), gs.VPSDE()
    y = torch.arange(64) % 4
    null = {"class_labels": torch.full_like(y, target.null_label)}
    score = target.score_fn(sde)
    plain = gs.sample(score, sde, (64, 2), steps=30, generator=torch.Generator().manual_seed(1), class_labels=y)
    guided = gs.sample(score, sde, (64, 2), steps=30, generator=torch.Generator().manual_seed(1), class_labels=y,
                       guidance_scale=0.0, null_cond=null)
    assert torch.equal(plain, guided)
    x, t = torch.randn(64, 2, generator=gen, dtype=F64), torch.full((64,), 0.4, dtype=F64)
    s_w = guided_score(score, 2.0, {"class_labels": y}, null)(x, t)
    expected = 3 * target.score(x, t, sde, class_labels=y) - 2 * target.marginal().score(x, t, sde)
    torch.testing.assert_close(s_w, expected)
    shifted = gs.sample(score, sde, (64, 2), steps=30, generator=torch.Generator().manual_seed(1), class_labels=y,
                        guidance_scale=2.0, null_cond=null)
    assert not torch.equal(plain, shifted)
    with pytest.raises(ValueError, match="needs null_cond"):
        gs.sample(score, sde, (64, 2), steps=2, class_labels=y, guidance_scale=1.0)
    with pytest.raises(ValueError, match="'class_labels' has shape \\(3,\\)"):
        gs.sample(score, sde, (64, 2), steps=2, class_labels=y[:3])


class CondEnergy(nn.Module):
    """A label-conditional scalar backbone ``(x, t, class_labels) -> [B]`` (labels 0..3, 4 = null)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 16)
        self.net = nn.Sequential(nn.Linear(2 + 1 + 16, 32), nn.SiLU(), nn.Linear(32, 1))

    def forward(self, x, t, class_labels):
        return self.net(torch.cat([x, t[:, None].to(x.dtype), self.embed(class_labels).to(x.dtype)], 1))[:, 0]


def test_guided_energy_model_stays_conservative(gen):
    """docs/theory.md §9.5: s_w = -grad[(1 + w) E(x | c) - w E(x | null)] is a gradient, so its Jacobian in x is
    symmetric (float64 autograd, rounding 1e-10) for an untrained conditional EnergyScore and w = 3."""
    sde = gs.VPSDE()
    model = gs.EnergyScore(CondEnergy().double(), sde)
    y = torch.tensor([0, 1, 2, 3])
    s_w = guided_score(model, 3.0, {"class_labels": y}, {"class_labels": torch.full_like(y, 4)})
    x, t = torch.randn(4, 2, generator=gen, dtype=F64), torch.full((4,), 0.3, dtype=F64)
    for b in range(4):
        J = torch.autograd.functional.jacobian(lambda z, b=b: s_w(z[None].expand(4, 2).contiguous(), t)[b], x[b])
        torch.testing.assert_close(J, J.T, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ objectives
class Recording(nn.Module):
    """Records the keywords every call receives; ``scalar=True`` returns ``[B]`` (a critic or an energy)."""

    def __init__(self, scalar=False):
        super().__init__()
        self.embed, self.calls = nn.Embedding(4, 2), []
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1 if scalar else 2))
        self.scalar = scalar

    def forward(self, x, t, **cond):
        self.calls.append(cond)
        h = self.net(torch.cat([x + self.embed(cond["class_labels"]), t[:, None].to(x.dtype)], 1))
        return h[:, 0] if self.scalar else h


@pytest.mark.parametrize("name", list(gs.OBJECTIVES))
def test_every_objective_trains_with_class_labels_and_the_labels_reach_model_and_critic(name, gen):
    """3 train_step calls per objective (every phase), labels passed as keywords and, for the second form, with
    the batch from a callable: every call of the model and of the critic receives exactly the batch's labels,
    and the parameters move."""
    sde, spec = gs.VPSDE(), gs.OBJECTIVES[name]
    backbone = Recording(scalar=False)
    model = gs.EnergyScore(backbone, sde) if spec.parametrisation == "energy" else gs.ScoreModel(backbone, sde)
    critic_backbone = Recording(scalar=True)
    critic = gs.Critic(critic_backbone, sde) if spec.needs_critic else None
    objective = gs.build_objective(name, sde, critic=critic)
    params = [*model.parameters(), *(critic.parameters() if critic is not None else [])]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    x0, y = torch.randn(16, 2, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    for _ in range(2):
        loss = gs.train_step(objective, model, x0, opt, class_labels=y)
        assert torch.isfinite(loss)
    loss = gs.train_step(objective, model, lambda: (x0, {"class_labels": y}), opt)
    assert torch.isfinite(loss)
    for recorder in [backbone] + ([critic_backbone] if critic is not None else []):
        assert recorder.calls and all(torch.equal(c["class_labels"], y) for c in recorder.calls)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    with pytest.raises(ValueError, match="'class_labels' has shape \\(15,\\)"):
        objective(model, x0, class_labels=y[:15])


def test_critic_loss_and_projection_forward_the_condition(gen):
    sde = gs.VPSDE()
    backbone, critic_backbone = Recording(), Recording(scalar=True)
    objective = gs.DualSobolevLoss(sde, gs.Critic(critic_backbone, sde), n_critic=3)
    x0, y = torch.randn(8, 2, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    objective.critic_loss(gs.ScoreModel(backbone, sde), x0, class_labels=y)
    objective.projection(gs.ScoreModel(backbone, sde), x0, class_labels=y)
    assert len(backbone.calls) == len(critic_backbone.calls) == 2
    assert all(torch.equal(c["class_labels"], y) for c in backbone.calls + critic_backbone.calls)


# ------------------------------------------------------------------------------------------ data parallel
def test_an_unprepared_critic_is_refused_in_a_multi_process_run(tmp_path, monkeypatch):
    """A real gloo process group (world size 1, so DDP can be built), reported as world size 2. With a DDP-wrapped
    score model a plain critic raises, naming the rank and objectives.prepare (joint loss and critic_loss); the
    DDP-wrapped critic runs. A score model that is not wrapped (a rank-local reference computation) is let through,
    as is a single process (no group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sde = gs.VPSDE()
    critic = gs.Critic(gs.TimeMLP(2, 8, 1, out_dim=1), sde)
    model = gs.ScoreModel(gs.TimeMLP(2, 8, 1), sde)
    objective = gs.build_objective("l2+dual_sobolev", sde, critic=critic)
    objective(model, torch.randn(4, 2))                                   # no process group: fine
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp_model, ddp_critic = DistributedDataParallel(model), DistributedDataParallel(critic)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
        with pytest.raises(RuntimeError, match=r"rank 0 of 2: the critic Critic is not wrapped.*prepare"):
            objective(ddp_model, torch.randn(4, 2))
        with pytest.raises(RuntimeError, match="not wrapped"):
            objective.critic_loss(ddp_model, torch.randn(4, 2))
        assert torch.isfinite(objective(model, torch.randn(4, 2)).sum())           # rank-local: both unwrapped
        objective.critic = ddp_critic
        assert torch.isfinite(objective(ddp_model, torch.randn(4, 2)).sum())
        check_critic_prepared(None, "l2", ddp_model)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_prepare_hands_the_objective_its_prepared_critic():
    """objectives.prepare calls accelerator.prepare once on (model, critic, optimizer) and stores the prepared
    critic on the objective (a recording accelerator tells what was prepared; a real one trains a step)."""
    from accelerate import Accelerator

    sde = gs.VPSDE()
    model, critic = gs.ScoreModel(gs.TimeMLP(2, 8, 1), sde), gs.Critic(gs.TimeMLP(2, 8, 1, out_dim=1), sde)
    objective = gs.build_objective("dual_sobolev", sde, critic=critic, n_critic=2)
    opt = torch.optim.Adam([*model.parameters(), *critic.parameters()])

    class Recorder:
        calls = []

        def prepare(self, *objs):
            self.calls.append(objs)
            return tuple(("prepared", o) for o in objs)

    prepared_model, prepared_opt = gs.prepare(Recorder(), model, objective, opt)
    assert Recorder.calls == [(model, critic, opt)]
    assert (prepared_model, objective.critic, prepared_opt) == (("prepared", model), ("prepared", critic),
                                                                ("prepared", opt))
    objective.critic = critic
    accelerator = Accelerator(cpu=True)
    prepared_model, prepared_opt = gs.prepare(accelerator, model, objective, opt)
    assert torch.isfinite(gs.train_step(objective, prepared_model, torch.randn(8, 2), prepared_opt))
    l2 = gs.build_objective("l2", sde)
    assert len(gs.prepare(Recorder(), model, l2, opt)) == 2 and Recorder.calls[-1] == (model, opt)
