"""Critic, dual-Sobolev objective and energy objective: exact identities (docs/theory.md §5 and §7).

Every check here is deterministic (fixed t, noise): the tolerances are float32/float64 rounding."""
import pytest
import torch
from torch import nn

import gradscore as gs
from gradscore.objectives import DualSobolevLoss, EnergyDSMLoss
from gradscore.objectives.dual_sobolev import reverse_gradient


class Quadratic(nn.Module):
    """psi~(x, t) = x^T A x / 2 + b.x (a scalar backbone with a known gradient)."""

    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = nn.Parameter(A + A.T)
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        return 0.5 * torch.einsum("bi,ij,bj->b", x, self.A, x) + x @ self.b


def small_models(d=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    sde = gs.VPSDE()
    model = gs.ScoreModel(gs.TimeMLP(d, 16, 2), sde).to(dtype)
    critic = gs.Critic(gs.TimeMLP(d, 16, 2, out_dim=1), sde).to(dtype)
    return sde, model, critic


def test_critic_is_the_gradient_of_psi_over_sigma():
    # Oracle: psi = psi~ / sigma_t with psi~ = x^T A x / 2 + b.x, so grad psi = (A x + b) / sigma_t exactly.
    sde = gs.VPSDE()
    quad = Quadratic(3)
    critic = gs.Critic(quad, sde)
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    expected = (x @ quad.A.T + quad.b) / sde.sigma(t)[:, None]
    torch.testing.assert_close(critic(x, t), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(critic.potential(x, t), quad(x, t) / sde.sigma(t), rtol=1e-12, atol=1e-12)
    assert not x.requires_grad                                    # the caller's tensor is untouched


def test_critic_gives_every_parameter_a_gradient():
    # DDP without find_unused_parameters needs a gradient (here exactly 0) for the scalar head's bias.
    sde, _, critic = small_models()
    x = torch.randn(4, 2, dtype=torch.float64)
    critic(x, 0.5).pow(2).sum().backward()
    last_bias = critic.backbone.net[-1].bias
    assert all(p.grad is not None for p in critic.parameters())
    assert torch.all(last_bias.grad == 0)


def test_critic_rejects_a_vector_backbone():
    sde = gs.VPSDE()
    critic = gs.Critic(gs.TimeMLP(2, 8, 1), sde)                  # returns [B, 2], not one scalar
    with pytest.raises(ValueError, match=r"one scalar per sample.*\(4, 2\)"):
        critic(torch.randn(4, 2), 0.5)


def test_dual_sobolev_value_matches_the_formula():
    # Per sample: lambda(t) (2 r.g - |g|^2) + l2_weight lambda(t) |r|^2, r = s + eps/sigma, g = grad psi(x_t).
    sde, model, critic = small_models()
    x0, eps = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    xt = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps
    r = model(xt, t) + eps / sde.sigma(t)[:, None]
    g = critic(xt, t)
    lam = sde.g2(t)
    expected_proj = lam * (2 * (r * g).sum(1) - g.pow(2).sum(1))
    for l2_weight in (0.0, 0.7):
        obj = DualSobolevLoss(sde, critic, weighting="likelihood", l2_weight=l2_weight)
        got = obj(model, x0, t=t, noise=eps)
        torch.testing.assert_close(got, expected_proj + l2_weight * lam * r.pow(2).sum(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(obj.critic_loss(model, x0, t=t, noise=eps), -expected_proj, rtol=1e-10, atol=1e-10)


def test_one_backward_gives_descent_for_score_and_ascent_for_critic():
    # loss.backward() must give dJ/dtheta to the score and -dJ/deta to the critic (gradient reversal),
    # checked against J's gradients computed separately with torch.autograd.grad.
    sde, model, critic = small_models()
    obj = DualSobolevLoss(sde, critic)
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    obj(model, x0, t=t, noise=eps).mean().backward()
    xt = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps
    sigma = sde.sigma(t)[:, None]
    residual_scaled, critic_scaled = sigma * model(xt, t) + eps, sigma * critic(xt, t)
    J = (2 * (residual_scaled * critic_scaled).sum(1) - critic_scaled.pow(2).sum(1)).mean()
    dJ_model = torch.autograd.grad(J, list(model.parameters()), retain_graph=True)
    dJ_critic = torch.autograd.grad(J, list(critic.parameters()), allow_unused=True)
    for p, g in zip(model.parameters(), dJ_model):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    for p, g in zip(critic.parameters(), dJ_critic):
        torch.testing.assert_close(p.grad, -(g if g is not None else torch.zeros_like(p)), rtol=1e-9, atol=1e-12)
    # critic_loss moves only the critic, with the same direction as the joint step
    model.zero_grad(), critic.zero_grad()
    obj.critic_loss(model, x0, t=t, noise=eps).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    for p, g in zip(critic.parameters(), dJ_critic):
        torch.testing.assert_close(p.grad, -(g if g is not None else torch.zeros_like(p)), rtol=1e-9, atol=1e-12)


def test_reverse_gradient_is_identity_forward_and_negates_backward():
    x = torch.randn(3, requires_grad=True)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, -torch.tensor([1.0, 2.0, 3.0]))


def test_dual_sobolev_reads_the_critic_attribute_at_every_call():
    # A driver replaces objective.critic by its wrapped module; the objective must use the new one.
    sde, model, critic = small_models()
    obj = DualSobolevLoss(sde, critic)
    calls = []

    class Wrapped(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, t):
            calls.append(1)
            return self.module(x, t)

    obj.critic = Wrapped(critic)
    obj(model, torch.randn(4, 2, dtype=torch.float64), t=0.5)
    assert calls == [1]


def test_dual_sobolev_rejects_bad_arguments():
    sde, model, critic = small_models()
    with pytest.raises(ValueError, match="l2_weight"):
        DualSobolevLoss(sde, critic, l2_weight=-1.0)
    with pytest.raises(ValueError, match="n_critic"):
        DualSobolevLoss(sde, critic, n_critic=0)
    with pytest.raises(ValueError, match="needs a critic"):
        DualSobolevLoss(sde, None)
    # a raw scalar backbone instead of a Critic: the output shape is named
    obj = DualSobolevLoss(sde, gs.TimeMLP(2, 8, 1, out_dim=1).double())
    with pytest.raises(ValueError, match=r"shaped like x \(4, 2\), got \(4,\)"):
        obj(model, torch.randn(4, 2, dtype=torch.float64))
    obj = DualSobolevLoss(sde, critic)
    with pytest.raises(ValueError, match="noise"):
        obj(model, torch.randn(4, 2, dtype=torch.float64), noise=torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="t must be"):
        obj(model, torch.randn(4, 2, dtype=torch.float64), t=torch.rand(3, dtype=torch.float64))


def test_energy_objective_is_dsm_on_an_energy_model_and_rejects_others():
    sde = gs.VPSDE()
    torch.manual_seed(0)
    energy_model = gs.EnergyScore(gs.TimeMLP(2, 16, 2), sde)
    x0, eps, t = torch.randn(5, 2), torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    obj = EnergyDSMLoss(sde)
    torch.testing.assert_close(obj(energy_model, x0, t=t, noise=eps), gs.DSMLoss(sde)(energy_model, x0, t=t, noise=eps))

    class DDPLike(nn.Module):                                     # DistributedDataParallel keeps .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, t):
            return self.module(x, t)

    torch.testing.assert_close(obj(DDPLike(energy_model), x0, t=t, noise=eps), obj(energy_model, x0, t=t, noise=eps))
    with pytest.raises(TypeError, match="EnergyScore.*ScoreModel"):
        obj(gs.ScoreModel(gs.TimeMLP(2, 16, 2), sde), x0)


def test_critic_objective_is_maximised_at_the_residual():
    """Oracle: ``2 r.g - |g|^2 = |r|^2 - |r - g|^2`` per sample (float64 rounding, 1e-12), so its maximum
    over g is |r|^2, at g = r; it is homogeneous of degree 2; shapes must agree."""
    from gradscore.critic import critic_objective

    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    psi = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    value = critic_objective(r, psi)
    assert value.shape == (6,)
    torch.testing.assert_close(value, r.flatten(1).pow(2).sum(1) - (r - psi).flatten(1).pow(2).sum(1),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(critic_objective(r, r), r.flatten(1).pow(2).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(critic_objective(0.3 * r, 0.3 * psi), 0.09 * value, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"residual \(6, 2, 3\) and grad psi \(6, 6\)"):
        critic_objective(r, psi.reshape(6, 6))
