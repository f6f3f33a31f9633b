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

from gradscore import VPSDE, DSMLoss, EnergyScore, TimeMLP
from gradscore.parametrisation import call_backbone
from gradscore.sde import time_tensor

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
    t = sde.sample_time(B, generator=g, dtype=torch.float64)
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
        t = time_tensor(t, x, batch=x.shape[0])
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


# --------------------------------------------------------------------------- CompactSiLU (kept: the default)
def test_compact_silu_is_silu_with_its_derivatives():
    """Forward and first derivative are PyTorch's own kernels (``silu``, ``silu_backward``): bitwise
    equal to ``nn.SiLU`` outside ``create_graph``. Under ``create_graph`` PyTorch evaluates SiLU's
    derivative as a composite expression instead, so there, and for the written-out second
    derivative, the two agree to float32 rounding (1e-6); gradcheck/gradgradcheck in float64 (finite
    differences, their default tolerances) check the formulas themselves."""
    from gradscore.double_backward import CompactSiLU, _SiLU

    x64 = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiLU.apply, (x64,)) and torch.autograd.gradgradcheck(_SiLU.apply, (x64,))
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    v = torch.randn(64, 33, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, act in (("plain", torch.nn.SiLU()), ("compact", CompactSiLU())):
        y = act(x)
        (g1,) = torch.autograd.grad((y * v).sum(), x, retain_graph=True)
        (g,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), x)
        out[name] = (y, g1, g, h)
    (y_p, g1_p, g_p, h_p), (y_c, g1_c, g_c, h_c) = out["plain"], out["compact"]
    assert torch.equal(y_p, y_c) and torch.equal(g1_p, g1_c)
    assert torch.allclose(g_c, g_p, rtol=1e-6, atol=1e-7) and torch.allclose(h_c, h_p, rtol=1e-6, atol=1e-7)


def test_compact_silu_energy_on_a_unet_is_exact_and_saves_less():
    """EnergyScore converts its backbone's nn.SiLU (compact_silu). On a diffusers UNet with attention
    the DSM loss is bitwise the plain route's (same forward kernels) and the parameter gradients agree
    to float32 rounding (global relative 1e-5; measured 7e-7: only the SiLU second derivative is
    evaluated in another order), while the step saves at most 80% of the plain route's bytes for
    backward (measured 64% on the benchmark UNet, BENCHMARKS.md)."""
    import copy

    from diffusers import UNet2DModel

    from benchmarks.measure import saved_bytes
    from gradscore.double_backward import CompactSiLU

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    sde = VPSDE()
    compact = EnergyScore(unet, sde)
    assert sum(type(m) is CompactSiLU for m in compact.modules()) > 5
    plain = copy.deepcopy(compact)
    for m in plain.modules():
        if type(m) is CompactSiLU:
            m.__class__ = torch.nn.SiLU
    x0 = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loss_c, grads_c = _plain(compact, sde, x0)
    loss_p, grads_p = _plain(plain, sde, x0)
    assert torch.equal(loss_c, loss_p)
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(grads_c, grads_p))
    den = sum(float(b.pow(2).sum()) for b in grads_p)
    assert (num / den) ** 0.5 < 1e-5
    def forward(m):
        return lambda: DSMLoss(sde)(m, x0, generator=torch.Generator().manual_seed(2)).mean()
    params = list(compact.parameters()) + list(plain.parameters())
    assert saved_bytes(forward(compact), params) <= 0.8 * saved_bytes(forward(plain), params)


def test_compact_silu_keyword_converts_or_leaves_the_backbone():
    """EnergyScore and Critic take ``compact_silu``: True (default) converts the caller's nn.SiLU modules in
    place to CompactSiLU (same objects, same state dict); False leaves every module's class as it was.
    Either way the score / critic gradient is the same: bitwise outside ``create_graph`` (PyTorch's own
    silu and silu_backward kernels in both), to float32 rounding (1e-6) under it."""
    from gradscore import Critic
    from gradscore.double_backward import CompactSiLU

    sde = VPSDE()
    x, t = torch.randn(16, D, generator=torch.Generator().manual_seed(3)), torch.full((16,), 0.4)
    for wrap, out_dim in ((EnergyScore, None), (Critic, 1)):
        torch.manual_seed(0)
        untouched, converted = TimeMLP(D, 32, 2, out_dim=out_dim), TimeMLP(D, 32, 2, out_dim=out_dim)
        converted.load_state_dict(untouched.state_dict())
        silus = [m for m in untouched.modules() if isinstance(m, torch.nn.SiLU)]
        state = {k: v.clone() for k, v in untouched.state_dict().items()}
        plain_model = wrap(untouched, sde, compact_silu=False)
        assert silus and all(type(m) is torch.nn.SiLU for m in silus), wrap.__name__
        compact_model = wrap(converted, sde)
        assert all(type(m) is CompactSiLU for m in converted.modules() if isinstance(m, torch.nn.SiLU))
        assert converted.state_dict().keys() == state.keys()
        assert all(torch.equal(converted.state_dict()[k], v) for k, v in state.items())
        with torch.no_grad():
            assert torch.equal(plain_model(x, t), compact_model(x, t)), wrap.__name__
        torch.testing.assert_close(plain_model(x, t), compact_model(x, t), rtol=1e-6, atol=1e-6)
