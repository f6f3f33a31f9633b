"""Parametrisations (docs/theory.md §1 and §7): eps / score / x0 conversions, and the conservative
EnergyScore s = -grad_x E (double backward, diffusers UNet with attention)."""
import contextlib

import pytest
import torch
from torch import nn

import gradscore.double_backward as double_backward
import gradscore.parametrisation as parametrisation
from gradscore import DSMLoss, EnergyScore, ScoreModel, TimeMLP
from gradscore.sde import VESDE, VPSDE, DiscreteVPSDE, broadcast_to

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- ScoreModel
class GaussianOracle(nn.Module):
    """Exact predictions for data N(m, s0^2 I): score -(x - a m) / (a^2 s0^2 + sigma^2), noise -sigma * score,
    clean data E[x0 | x_t] = m + a s0^2 (x - a m) / (a^2 s0^2 + sigma^2) (Gaussian posterior mean, computed
    independently of Tweedie's formula), velocity E[v | x_t] = a E[eps | x_t] - sigma E[x0 | x_t]. For "edm" the
    input is (c_in x~, c_noise) in EDM's variables (x~ = x0 + s n, s = exp(4 c_noise)): from the posterior mean
    D = m + s0^2 (x~ - m) / (s0^2 + s^2) it returns F = (D - c_skip x~) / c_out (EDM's definitions, sigma_data sd)."""

    def __init__(self, sde, m, s0, kind, sd=0.5):
        super().__init__()
        self.sde, self.m, self.s0, self.kind, self.sd = sde, m, s0, kind, sd

    def forward(self, x, t):
        if self.kind == "edm":
            s = broadcast_to(torch.exp(4 * t), x)
            norm = (s**2 + self.sd**2).sqrt()
            x_ve = x * norm                                                  # c_in = 1 / norm
            D = self.m + self.s0**2 * (x_ve - self.m) / (self.s0**2 + s**2)
            c_skip, c_out = self.sd**2 / norm**2, s * self.sd / norm
            return (D - c_skip * x_ve) / c_out
        a, s = broadcast_to(self.sde.alpha(t), x), broadcast_to(self.sde.sigma(t), x)
        var = a**2 * self.s0**2 + s**2
        score = -(x - a * self.m) / var
        x0 = self.m + a * self.s0**2 * (x - a * self.m) / var
        return {"score": score, "eps": -s * score, "x0": x0, "v": a * (-s * score) - s * x0}[self.kind]


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10.0)], ids=["vp", "ve"])
def test_score_model_conversions_agree(sde, gen):
    """docs/theory.md §1: eps_hat = -sigma_t s and x0_hat = (x_t + sigma_t^2 s) / alpha_t. Backbones giving the
    exact eps / score / x0 of a Gaussian target must all yield the exact score (float64, rounding 1e-10)."""
    m, s0 = torch.tensor([0.5, -1.0, 2.0], dtype=F64), 0.7
    x = torch.randn(16, 3, generator=gen, dtype=F64) * 2
    t = torch.rand(16, generator=gen, dtype=F64) * 0.98 + 0.01
    exact = GaussianOracle(sde, m, s0, "score")(x, t)
    for kind in ScoreModel.OUTPUTS:
        extra = {"sigma_data": 0.5} if kind == "edm" else {}
        model = ScoreModel(GaussianOracle(sde, m, s0, kind), sde, output=kind, **extra)
        torch.testing.assert_close(model(x, t), exact, rtol=1e-10, atol=1e-10)


def test_score_model_formulas_for_a_known_function(gen):
    """The same conversions for an arbitrary backbone f(x, t) = sin(x) (1 + t): eps -> -f / sigma,
    x0 -> (alpha f - x) / sigma^2, score -> f. A float time equals a constant [B] tensor."""
    sde = VPSDE()
    f = lambda x, t: torch.sin(x) * (1 + broadcast_to(t, x))              # noqa: E731
    backbone = type("F", (nn.Module,), {"forward": lambda self, x, t: f(x, t)})()
    x = torch.randn(8, 2, 3, generator=gen, dtype=F64)
    t = torch.full((8,), 0.3, dtype=F64)
    a, s = sde.alpha(t)[:, None, None], sde.sigma(t)[:, None, None]
    torch.testing.assert_close(ScoreModel(backbone, sde, "eps")(x, t), -f(x, t) / s)
    torch.testing.assert_close(ScoreModel(backbone, sde, "x0")(x, t), (a * f(x, t) - x) / s**2)
    torch.testing.assert_close(ScoreModel(backbone, sde, "score")(x, t), f(x, t))
    torch.testing.assert_close(ScoreModel(backbone, sde, "eps")(x, 0.3), -f(x, t) / s)


def test_score_model_keeps_x_dtype(gen):
    """A float64 time with float32 data gives a float32 score (it used to be promoted to float64)."""
    sde = VPSDE()
    x = torch.randn(4, 2, generator=gen)
    t = torch.full((4,), 0.3, dtype=F64)
    for kind in ScoreModel.OUTPUTS:
        extra = {"sigma_data": 0.5} if kind == "edm" else {}
        assert ScoreModel(TimeMLP(2, 8, 1), sde, output=kind, **extra)(x, t).dtype == torch.float32


def test_score_model_errors():
    sde = VPSDE()
    with pytest.raises(ValueError, match="output"):
        ScoreModel(nn.Identity(), sde, output="velocity")
    model = ScoreModel(TimeMLP(2, 8, 1, out_dim=3), sde)
    with pytest.raises(ValueError, match="backbone output"):
        model(torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match="t must be"):
        ScoreModel(TimeMLP(2, 8, 1), sde)(torch.zeros(4, 2), torch.zeros(3))


def small_unet(attention=True, channels=1):
    """UNet2DModel with attention in a down block, an up block and the mid block (SDPA by default)."""
    from diffusers import UNet2DModel
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=8,
                       attention_head_dim=8, add_attention=attention)


def test_diffusers_backbone_gets_the_sde_timestep(gen):
    """call_backbone hands a diffusers model sde.timestep(t) (999 t for VP; (N-1) t for a discrete schedule)
    and unwraps .sample."""
    unet = small_unet(attention=False).eval()
    x = torch.randn(2, 1, 16, 16, generator=gen)
    t = torch.tensor([0.25, 0.75])
    for sde, steps in ((VPSDE(), 999 * t), (DiscreteVPSDE(torch.linspace(0.99, 0.01, 100)), 99 * t)):
        with torch.no_grad():
            eps_hat = unet(x, steps).sample
            torch.testing.assert_close(ScoreModel(unet, sde)(x, t), -eps_hat / sde.sigma(t)[:, None, None, None])


# ---------------------------------------------------------------------------------------------- EnergyScore
class Linear(nn.Module):
    """f(x, t) = x A^T (A a fixed matrix); ignores t."""

    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, x, t):
        return x @ self.A.T


def test_energies_closed_forms(gen):
    """Each named energy against its hand-derived score (float64, rounding 1e-10), with E = E~ / sigma_t:
    inner, f = A x, A symmetric: s = -A x / sigma; norm, f = A x: s = -A^T A x / sigma;
    residual, f = c constant: s = -(x - c) / sigma^2 (the conditional score when c = alpha_t x0);
    scalar, f = |x|^2 / 2: s = -x / sigma."""
    sde = VPSDE()
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    t = torch.rand(6, generator=gen, dtype=F64) * 0.9 + 0.05
    sig = sde.sigma(t)[:, None]
    B = torch.randn(3, 3, generator=gen, dtype=F64)
    A = B + B.T
    c = torch.randn(6, 3, generator=gen, dtype=F64)
    const = type("C", (nn.Module,), {"forward": lambda self, x, t: c})()
    half_sq = type("H", (nn.Module,), {"forward": lambda self, x, t: 0.5 * x.pow(2).sum(1)})()
    torch.testing.assert_close(EnergyScore(Linear(A), sde, "inner")(x, t), -x @ A.T / sig, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(EnergyScore(Linear(B), sde, "norm")(x, t), -x @ (B.T @ B).T / sig,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(EnergyScore(const, sde, "residual")(x, t), -(x - c) / sig**2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(EnergyScore(half_sq, sde, "scalar")(x, t), -x / sig, rtol=1e-10, atol=1e-10)
    custom = EnergyScore(Linear(A), sde, lambda f, x, sigma: (x * f).sum(1))
    torch.testing.assert_close(custom(x, t), -2 * x @ A.T / sig, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("energy", ["inner", "norm", "residual", "scalar"])
def test_energy_score_is_minus_gradient_of_energy(energy, gen):
    """EnergyScore(x) == -grad_x E(x) for a random TimeMLP backbone, checked three ways in float64:
    (1) against central finite differences of E (h = 1e-6: error O(h^2) + O(1e-16 / h), tolerance 1e-6);
    (2) torch.autograd.gradcheck of the score itself (its Jacobian -Hess E, i.e. the double backward);
    (3) that Jacobian is symmetric (a Hessian), 1e-10."""
    torch.manual_seed(1)
    backbone = TimeMLP(3, hidden=16, depth=2, out_dim=1 if energy == "scalar" else None).double()
    model = EnergyScore(backbone, VPSDE(), energy)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=F64)
    score = model(x, t)
    h, fd = 1e-6, torch.zeros_like(x)
    for i in range(3):
        e = torch.zeros_like(x)
        e[:, i] = h
        fd[:, i] = (model.energy(x + e, t) - model.energy(x - e, t)).detach() / (2 * h)
    torch.testing.assert_close(score, -fd, rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda xx: model(xx, t), (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)
    jac = torch.autograd.functional.jacobian(lambda xx: model(xx, t).sum(0), x)      # [d, B, d]
    jac = jac.permute(1, 0, 2)                                                           # [B, d, d]
    torch.testing.assert_close(jac, jac.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_parameter_gradient_through_double_backward(gen):
    """The training gradient d DSM / d theta flows through -grad_x E correctly: gradcheck (finite differences in
    float64) of the DSM loss as a function of the first-layer weight, with fixed t and noise."""
    torch.manual_seed(2)
    sde = VPSDE()
    backbone = TimeMLP(2, hidden=8, depth=2).double()
    model = EnergyScore(backbone, sde, "inner")
    x0 = torch.randn(5, 2, generator=gen, dtype=F64)
    t = torch.rand(5, generator=gen, dtype=F64) * 0.9 + 0.05
    noise = torch.randn(5, 2, generator=gen, dtype=F64)
    w0 = backbone.net[0].weight.detach().clone()

    def loss_of_weight(w):
        def score(xt, tt):
            return torch.func.functional_call(model, {"backbone.net.0.weight": w}, (xt, tt))
        return DSMLoss(sde)(score, x0, t=t, noise=noise).sum()

    assert torch.autograd.gradcheck(loss_of_weight, (w0.requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_energy_score_inference_builds_no_graph(gen):
    """Under torch.no_grad (sampling) the score is detached; with grad on it carries a graph to the parameters."""
    model = EnergyScore(TimeMLP(2, 8, 1), VPSDE())
    x = torch.randn(3, 2, generator=gen)
    with torch.no_grad():
        s = model(x, 0.5)
    assert not s.requires_grad and s.grad_fn is None
    assert model(x, 0.5).requires_grad


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_energy_score_unet_with_attention_trains(x_requires_grad, gen):
    """EnergyScore around a diffusers UNet2DModel WITH attention (SDPA, which has no double backward) trains:
    one Adam step where every parameter gets a non-None finite gradient and moves. The caller's x is not
    mutated (values, requires_grad, .grad). Negative control: with the math-kernel routing removed, the same
    step fails on SDPA's missing double backward, so this test does exercise attention."""
    sde = VPSDE()
    unet = small_unet(attention=True)
    from diffusers.models.attention_processor import Attention
    assert sum(isinstance(m, Attention) for m in unet.modules()) >= 3
    model = EnergyScore(unet, sde, "inner")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0 = torch.randn(4, 1, 16, 16, generator=gen)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    xt, eps = sde.perturb(x0, t, generator=gen)
    xt.requires_grad_(x_requires_grad)
    xt_before = xt.detach().clone()

    score = model(xt, t)
    loss = ((broadcast_to(sde.sigma(t), xt) * score + eps) ** 2).flatten(1).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert xt.requires_grad == x_requires_grad and torch.equal(xt.detach(), xt_before)
    if not x_requires_grad:
        assert xt.grad is None                  # (a caller who asked for grad_x gets it: loss depends on x)

    # negative control: without routing SDPA to the math kernel the double backward is impossible
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(double_backward, "math_attention", lambda *a: contextlib.nullcontext())
        mp.setattr(parametrisation, "math_attention", lambda *a: contextlib.nullcontext())
        opt.zero_grad()
        with pytest.raises(RuntimeError, match="not implemented"):
            DSMLoss(sde)(model, x0, t=t).mean().backward()


def test_energy_errors():
    sde = VPSDE()
    with pytest.raises(ValueError, match="energy must be one of"):
        EnergyScore(TimeMLP(2), sde, "bogus")
    with pytest.raises(TypeError, match="energy"):
        EnergyScore(TimeMLP(2), sde, 3)
    with pytest.raises(ValueError, match="scalar"):
        EnergyScore(TimeMLP(2), sde, "scalar")(torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match="shaped like x"):
        EnergyScore(TimeMLP(2, out_dim=1), sde, "inner")(torch.zeros(4, 2), 0.5)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, init_file, batch, state, out_path, steps, energy):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sde = VPSDE()
        model = _ddp_model(sde, energy)
        model.load_state_dict(state)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        x0, t, noise = (v.chunk(world)[rank] for v in batch)
        for _ in range(steps):
            loss = DSMLoss(sde)(ddp, x0, t=t, noise=noise).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            torch.save(model.state_dict(), out_path)
        dist.barrier()                  # tear down together: a rank leaving early can abort gloo in the other
    finally:
        dist.destroy_process_group()


def _ddp_model(sde, energy):
    torch.manual_seed(3)
    return EnergyScore(TimeMLP(2, hidden=16, depth=2, out_dim=1 if energy == "scalar" else None).double(), sde, energy)


@pytest.mark.slow
@pytest.mark.parametrize("energy", ["inner", "scalar"])
def test_energy_score_is_exact_under_ddp(energy, tmp_path, gen):
    """docs/engineering.md, "Double backward": double backward outside the DDP forward gives wrong gradients;
    EnergyScore takes the gradient inside forward. Oracle: 2 gloo processes, each on half the batch, end with the
    parameters of one process on the whole batch after 3 SGD steps (float64; tolerance 1e-10: only the order of the
    gradient all-reduce differs).
    energy="scalar" has a parameter that gets no gradient through -grad_x E (the head's last bias): it must still
    work (it used to fail with "Expected to have finished reduction") and that bias must stay put."""
    import torch.multiprocessing as mp

    sde, steps = VPSDE(), 3
    model = _ddp_model(sde, energy)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(16, 2, generator=gen, dtype=F64), torch.rand(16, generator=gen, dtype=F64) * 0.9 + 0.05,
             torch.randn(16, 2, generator=gen, dtype=F64))
    x0, t, noise = batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        # mean over the two halves' means == the DDP average of the two ranks' gradients
        halves = [(x0.chunk(2)[r], t.chunk(2)[r], noise.chunk(2)[r]) for r in range(2)]
        loss = torch.stack([DSMLoss(sde)(model, x, t=tt, noise=nn_).mean() for x, tt, nn_ in halves]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), batch, state, str(out), steps, energy), nprocs=2, join=True)
    ddp_state = torch.load(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-10, atol=1e-10, msg=f"{k} differs under DDP")
    assert any(not torch.equal(state[k], v) for k, v in model.state_dict().items())   # training did move them
    if energy == "scalar":
        last_bias = "backbone.net.4.bias"
        assert torch.equal(ddp_state[last_bias], state[last_bias])
