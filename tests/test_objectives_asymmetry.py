"""Jacobian-asymmetry penalty (docs/theory.md §7): exact against dense Jacobians.

For a fixed probe ``v`` the estimator ``1/2 |J v - J^T v|^2`` is deterministic, so it is compared
with the dense ``torch.autograd.functional.jacobian`` at float64 rounding; averaging it over ALL
``2^d`` Rademacher sign vectors gives ``1/2 ||J - J^T||_F^2`` exactly (``E[v v^T] = I`` holds
exactly for the uniform distribution on the sign vectors)."""
import itertools

import pytest
import torch

import gradscore as gs
from gradscore.objectives import AsymmetryPenalty
from gradscore.objectives.asymmetry import asymmetry_probe, draw_probes


def dense_jacobians(fn, x):
    """Per-sample Jacobians ``[B, d, d]`` of a per-sample map ``fn: [B, d] -> [B, d]``."""
    return torch.stack([torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], xi) for xi in x])


def model_and_x(d=3, B=4, seed=0):
    torch.manual_seed(seed)
    sde = gs.VPSDE()
    model = gs.ScoreModel(gs.TimeMLP(d, 16, 2), sde).double()
    x = torch.randn(B, d, dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64) * 0.8 + 0.1
    return sde, model, x, t


def test_probe_is_exact_against_the_dense_jacobian():
    sde, model, x, t = model_and_x()
    J = torch.stack([dense_jacobians(lambda z, i=i: model(z, t[i:i + 1]), x[i:i + 1])[0] for i in range(len(x))])
    xg = x.clone().requires_grad_(True)
    score = model(xg, t)
    for probe in ("rademacher", "gaussian"):
        v = draw_probes(x.shape, probe, torch.Generator().manual_seed(1), dtype=torch.float64)
        A = J - J.transpose(1, 2)
        expected = 0.5 * torch.einsum("bij,bj->bi", A, v).pow(2).sum(1)
        torch.testing.assert_close(asymmetry_probe(score, xg, v), expected, rtol=1e-10, atol=1e-12)


def test_average_over_all_sign_vectors_is_half_the_frobenius_norm():
    sde, model, x, t = model_and_x(d=3)
    J = torch.stack([dense_jacobians(lambda z, i=i: model(z, t[i:i + 1]), x[i:i + 1])[0] for i in range(len(x))])
    frob = 0.5 * (J - J.transpose(1, 2)).pow(2).sum((1, 2))
    xg = x.clone().requires_grad_(True)
    score = model(xg, t)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64)   # 8 probes
    avg = sum(asymmetry_probe(score, xg, s.expand_as(x)) for s in signs) / len(signs)
    torch.testing.assert_close(avg, frob, rtol=1e-10, atol=1e-12)
    assert torch.all(frob > 1e-6)                                  # a generic MLP is not conservative


def test_penalty_is_zero_for_conservative_and_known_for_rotation_fields():
    # s = -grad E has a symmetric Jacobian: zero penalty. s = M x with M = c K (K skew) has
    # J - J^T = 2 c K, so 1/2 |(J - J^T) v|^2 = 2 c^2 |K v|^2 = 2 c^2 |v|^2 for a 2-D rotation generator.
    sde = gs.VPSDE()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    v = draw_probes(x.shape, "gaussian", torch.Generator().manual_seed(2), dtype=torch.float64)
    energy_model = gs.EnergyScore(gs.TimeMLP(2, 16, 2), sde).double()
    pen = asymmetry_probe(energy_model(x, 0.4), x, v)
    assert pen.abs().max() < 1e-20
    c = 1.5
    K = gs.toy.skew_matrix(2, dtype=torch.float64)
    pen = asymmetry_probe(x @ (c * K).T, x, v)
    torch.testing.assert_close(pen, 2 * c**2 * v.pow(2).sum(1), rtol=1e-12, atol=1e-12)


def test_objective_is_dsm_plus_weighted_penalty():
    sde, model, x0, t = model_and_x()
    eps = torch.randn_like(x0)
    probes = draw_probes((2, *x0.shape), "rademacher", torch.Generator().manual_seed(4), dtype=torch.float64)
    obj = AsymmetryPenalty(sde, asymmetry_weight=0.3, probes=2)
    got = obj(model, x0, t=t, noise=eps, probe_vectors=probes)
    xt = (sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps).requires_grad_(True)
    score = model(xt, t)
    pen = (asymmetry_probe(score, xt, probes[0]) + asymmetry_probe(score, xt, probes[1])) / 2
    lam = sde.sigma(t) ** 2
    expected = gs.DSMLoss(sde)(model, x0, t=t, noise=eps) + 0.3 * lam * sde.sigma(t) ** 2 * pen
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(got > gs.DSMLoss(sde)(model, x0, t=t, noise=eps))


def test_paper_weighting_is_sigma2_whatever_the_dsm_weighting():
    """``penalty_weighting="sigma2"`` (Chao et al. 2022): the penalty is weighted by sigma_t^2 alone, not by
    lambda(t) sigma_t^2, so with the likelihood weighting lambda = g^2 the objective is
    ``DSM_likelihood + w sigma_t^2 pen``. Same probes and noise: float64 rounding (1e-10)."""
    sde, model, x0, t = model_and_x()
    eps = torch.randn_like(x0)
    probes = draw_probes((1, *x0.shape), "rademacher", torch.Generator().manual_seed(4), dtype=torch.float64)
    obj = AsymmetryPenalty(sde, weighting="likelihood", asymmetry_weight=0.3, penalty_weighting="sigma2")
    got = obj(model, x0, t=t, noise=eps, probe_vectors=probes)
    xt = (sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps).requires_grad_(True)
    pen = asymmetry_probe(model(xt, t), xt, probes[0])
    expected = gs.DSMLoss(sde, weighting="likelihood")(model, x0, t=t, noise=eps) + 0.3 * sde.sigma(t) ** 2 * pen
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    default = AsymmetryPenalty(sde, weighting="likelihood", asymmetry_weight=0.3)(model, x0, t=t, noise=eps,
                                                                                    probe_vectors=probes)
    expected_default = gs.DSMLoss(sde, weighting="likelihood")(model, x0, t=t, noise=eps) \
        + 0.3 * sde.g2(t) * sde.sigma(t) ** 2 * pen
    torch.testing.assert_close(default, expected_default, rtol=1e-10, atol=1e-12)
    assert gs.OBJECTIVES["asymmetry"].defaults["penalty_weighting"] == "lambda_sigma2"
    with pytest.raises(ValueError, match="penalty_weighting must be one of"):
        AsymmetryPenalty(sde, penalty_weighting="paper")


def test_penalty_trains_without_backward_inside_and_under_autocast(monkeypatch):
    # The loss may only use autograd.grad: a backward inside it would break accelerate/DDP.
    sde, model, x0, _ = model_and_x()
    model = model.float()
    obj = AsymmetryPenalty(sde, asymmetry_weight=1.0)
    real_backward = torch.Tensor.backward

    def forbidden(*args, **kwargs):
        raise AssertionError("backward called inside the loss")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = obj(model, x0.float(), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.Tensor, "backward", real_backward)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_asymmetry_rejects_bad_arguments():
    sde = gs.VPSDE()
    with pytest.raises(ValueError, match="asymmetry_weight"):
        AsymmetryPenalty(sde, asymmetry_weight=-0.1)
    with pytest.raises(ValueError, match="probes"):
        AsymmetryPenalty(sde, probes=0)
    with pytest.raises(ValueError, match="probe must be one of"):
        AsymmetryPenalty(sde, probe="sphere")
    obj = AsymmetryPenalty(sde, probes=2)
    model = gs.ScoreModel(gs.TimeMLP(2, 8, 1), sde)
    with pytest.raises(ValueError, match=r"probe_vectors must have shape \(2, 4, 2\)"):
        obj(model, torch.randn(4, 2), probe_vectors=torch.randn(1, 4, 2))


def test_penalty_trains_a_unet_with_attention():
    """The Jacobian probes double-backward through attention: fused SDPA kernels have no double
    backward, so the model call must run on the math kernel. Oracle: a step runs and every
    parameter gets a finite gradient (without the math kernel the backward raises)."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, layers_per_block=1)
    sde = gs.VPSDE()
    model = gs.ScoreModel(unet, sde)
    loss = AsymmetryPenalty(sde, asymmetry_weight=1.0)(model, torch.randn(2, 1, 8, 8)).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
