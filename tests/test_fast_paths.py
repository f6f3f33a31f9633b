"""Exact alternatives to the plain double backward of ``EnergyScore`` (benchmarks/, BENCHMARKS.md).

The energy objective trains through ``s = -grad_x E``: forward, an inner ``autograd.grad`` with
``create_graph`` and a backward through both graphs. BENCHMARKS.md lists the cheaper-looking routes
that were measured; a route is only worth measuring if it gives the *same* loss and the *same*
parameter gradients. These tests pin that down for the two routes a user may reach for:

* reverse-over-forward: with the cotangent ``a = dL/ds`` held fixed, ``dL/dtheta`` is the parameter
  gradient of ``-<a, grad_x E> = -d/de E(x + e a)``, a forward-mode directional derivative;
* non-reentrant activation checkpointing of the backbone inside the energy.

Neither was kept as the default (measured: not faster, no lower peak memory; see BENCHMARKS.md),
so the library's plain route is the reference here and these tests guard the claims of the table.
"""
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

from gradscore import DSMLoss, EnergyScore, TimeMLP, VPSDE
from gradscore.parametrisation import _time, call_backbone

B, D = 64, 3


def _setup(dtype, energy="inner"):
    torch.manual_seed(0)
    sde = VPSDE()
    model = EnergyScore(TimeMLP(D, 32, 2), sde, energy=energy).to(dtype)
    x0 = torch.randn(B, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return sde, model, x0


def _plain(model, sde, x0):
    """Loss and parameter gradients of the library's route (DSM on EnergyScore, one backward)."""
    model.zero_grad(set_to_none=True)
    loss = DSMLoss(sde)(model, x0, generator=torch.Generator().manual_seed(2)).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_reverse_over_forward_gives_the_double_backward_gradient():
    """``dL/dtheta = -d/dtheta <a, grad_x E>`` with ``a = dL/ds`` detached, the inner product taken by a
    forward-mode JVP of ``E`` along ``a``. float64 so the comparison is at rounding level (1e-10): both
    routes compute the same second derivatives in a different order."""
    sde, model, x0 = _setup(torch.float64)
    loss_ref, grads_ref = _plain(model, sde, x0)

    g = torch.Generator().manual_seed(2)                     # the same draws as DSMLoss
    t = sde.sample_t(B, generator=g, dtype=torch.float64)
    xt, eps = sde.perturb(x0, t, generator=g)
    with torch.no_grad():
        score = model(xt, t)                                  # forward without a graph
    s = score.detach().requires_grad_(True)
    sigma = sde.sigma(t)[:, None]
    loss = ((sigma * s + eps).pow(2).sum(1)).mean()           # DSM, weighting sigma^2 (lambda/sigma^2 = 1)
    (a,) = torch.autograd.grad(loss, s)                       # cotangent dL/ds
    with fwAD.dual_level():
        e_dual = model.energy(fwAD.make_dual(xt, a), t)
        directional = fwAD.unpack_dual(e_dual).tangent        # <a, grad_x E> per sample
    grads = torch.autograd.grad(-directional.sum(), list(model.parameters()), allow_unused=True)

    assert torch.allclose(loss.detach(), loss_ref, rtol=1e-12)
    for g_ref, g_jvp in zip(grads_ref, grads):
        g_jvp = torch.zeros_like(g_ref) if g_jvp is None else g_jvp
        assert torch.allclose(g_jvp, g_ref, rtol=1e-9, atol=1e-10 * g_ref.abs().max().item())


class _CheckpointedEnergy(EnergyScore):
    """``EnergyScore`` whose backbone runs under non-reentrant activation checkpointing."""

    def energy(self, x, t):
        t = _time(t, x)
        f = checkpoint(call_backbone, self.backbone, x, t, self.sde, self.time_input, use_reentrant=False).to(x.dtype)
        sigma = self.sde.sigma(t).to(x.dtype)
        return self._energy_fn(f, x, sigma) / sigma


def test_checkpointed_energy_is_exact_in_float32():
    """Recomputation repeats the same float32 operations in the same order, so loss and gradients
    agree to float32 rounding (rtol 1e-6; in practice bit-identical)."""
    for energy in ("inner", "residual"):
        sde, model, x0 = _setup(torch.float32, energy)
        ckpt = _CheckpointedEnergy(TimeMLP(D, 32, 2), sde, energy=energy)
        ckpt.load_state_dict(model.state_dict())
        loss_ref, grads_ref = _plain(model, sde, x0)
        loss, grads = _plain(ckpt, sde, x0)
        assert torch.allclose(loss, loss_ref, rtol=1e-6)
        for g_ref, g in zip(grads_ref, grads):
            assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-6 * g_ref.abs().max().item())
