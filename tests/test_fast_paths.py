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
    model.fused_input_gradient = False          # the general route (input_gradient) is the reference here
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
        ckpt.fused_input_gradient = False       # through its checkpointed energy()
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


def test_compact_silu_energy_on_a_unet_is_exact_and_saves_less(attention_unet):
    """EnergyScore converts its backbone's nn.SiLU (compact_silu). On a diffusers UNet with attention
    the DSM loss agrees with the plain route's to float32 rounding (1e-6 relative: the loss is a function of the
    score, whose SiLU derivative PyTorch evaluates as a composite expression under ``create_graph``, 4e-7 apart
    at most; the mean was bitwise equal by chance until the attention's forward became the fused kernel) and the
    parameter gradients agree to float32 rounding (global relative 1e-5; measured 7e-7: only the SiLU second
    derivative is evaluated in another order), while the step saves at most 80% of the plain route's bytes for
    backward (measured 64% on the benchmark UNet, BENCHMARKS.md)."""
    import copy

    from benchmarks.measure import saved_bytes
    from gradscore.double_backward import CompactSiLU

    unet = attention_unet()
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
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=0)
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


# ------------------------------------------------ the scalar TimeMLP critic as one fused node (kept: the default)
def _critic_grads(critic, sde, x0, fused, dtype, l2_weight=0.0):
    """Loss, critic output and every parameter gradient of one ``dual_sobolev`` step; ``fused=False``
    forces the general route (``input_gradient``) by patching the dispatch out."""
    import gradscore
    from gradscore.critic import Critic

    torch.manual_seed(3)
    model = gradscore.ScoreModel(TimeMLP(x0[0].numel(), 24, 2), sde).to(dtype)
    objective = gradscore.DualSobolevLoss(sde, critic, l2_weight=l2_weight)
    saved = Critic._silu_mlp_layers
    try:
        if not fused:
            Critic._silu_mlp_layers = lambda self, x: None
        loss = objective(model, x0, generator=torch.Generator().manual_seed(2)).mean()
        loss.backward()
        t = torch.rand(B, dtype=dtype, generator=torch.Generator().manual_seed(4))
        g = critic(x0, t).detach()
    finally:
        Critic._silu_mlp_layers = saved
    grads = [p.grad.clone() for p in (*model.parameters(), *critic.parameters())]
    for p in (*model.parameters(), *critic.parameters()):
        p.grad = None
    return loss.detach(), g, grads


def test_fused_timemlp_critic_is_the_general_route():
    """``Critic(TimeMLP(d, out_dim=1))`` takes ``grad_x psi`` as one fused node
    (``double_backward.silu_mlp_input_gradient``: the adjoints of the forward and gradient passes written
    out). Same function and gradients as ``input_gradient``: the critic output, the loss and every
    parameter gradient (score and critic, through a ``dual_sobolev`` step) agree to 1e-12 relative in
    float64 (d = 3 and 64) and 2e-5 in float32 (reassociated sums); the head bias still gets an exact zero gradient
    (DDP sees every parameter), and the state dict is untouched."""
    from gradscore import Critic

    for (dim, dtype, tol) in ((D, torch.float64, 1e-12), (D, torch.float32, 2e-5), (64, torch.float64, 1e-12)):
        torch.manual_seed(0)                             # d = 3 and d = 64 (a flattened 8x8 image)
        sde = VPSDE()
        critic = Critic(TimeMLP(dim, 19, 3, out_dim=1), sde).to(dtype)
        keys = list(critic.state_dict())
        x0 = torch.randn(B, dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
        for l2_weight in (0.0, 1.0):
            loss_f, g_f, grads_f = _critic_grads(critic, sde, x0, True, dtype, l2_weight)
            loss_p, g_p, grads_p = _critic_grads(critic, sde, x0, False, dtype, l2_weight)
            assert torch.allclose(loss_f, loss_p, rtol=tol, atol=0)
            assert torch.allclose(g_f, g_p, rtol=0, atol=tol * g_p.abs().max().item())
            for a, b in zip(grads_f, grads_p):
                assert torch.allclose(a, b, rtol=0, atol=tol * b.abs().max().item() + 1e-300)
        head_bias = critic.backbone.net[-1].bias
        assert grads_f[-1].shape == head_bias.shape and torch.equal(grads_f[-1], torch.zeros_like(head_bias))
        assert list(critic.state_dict()) == keys


def test_fused_silu_mlp_gradient_higher_derivatives_and_dispatch():
    """The fused node against autograd on the same MLP in float64 (1e-12 relative): parameter gradients
    of a loss of the gradient, the third derivative (``create_graph`` through its backward, which then
    recomputes the plain graph) and the derivative with respect to the input. ``Critic`` uses it only
    for a ``TimeMLP`` scalar critic in grad mode, without hooks, autocast or an input requiring grad
    (anything else takes ``input_gradient``, unchanged)."""
    from gradscore import Critic
    from gradscore.double_backward import _silu_mlp_input_gradient_plain, silu_mlp_input_gradient

    torch.manual_seed(0)
    net = TimeMLP(D, 13, 3, out_dim=1).double()
    linears = [m for m in net.net if isinstance(m, torch.nn.Linear)]
    wb = [p for m in linears[:-1] for p in (m.weight, m.bias)]
    params = list(net.parameters())
    u = torch.randn(B, D + 32, dtype=torch.float64)
    v = torch.randn(B, D, dtype=torch.float64)

    def close(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-12 * b.abs().max().item() + 1e-300)

    out = {}
    for name in ("fused", "plain"):
        uu = u.clone().requires_grad_(True)
        if name == "fused":
            g = silu_mlp_input_gradient(uu, D, linears[:-1], linears[-1])
        else:
            g = _silu_mlp_input_gradient_plain(uu, D, linears[-1].weight, linears[-1].bias, wb)[0]
        first = torch.autograd.grad((g * v).sum() + (g**2).sum(), [uu, *params], create_graph=True, allow_unused=True)
        first = [torch.zeros_like(p) if f is None else f for f, p in zip(first, [uu, *params])]
        third = torch.autograd.grad(sum((f**2).sum() for f in first[1:]), params, allow_unused=True)
        out[name] = (g, first, [torch.zeros_like(p) if h is None else h for h, p in zip(third, params)])
    (g_f, first_f, third_f), (g_p, first_p, third_p) = out["fused"], out["plain"]
    assert close(g_f, g_p)
    assert all(close(a, b) for a, b in zip(first_f, first_p))
    assert all(close(a, b) for a, b in zip(third_f, third_p))

    critic, x = Critic(TimeMLP(D, 13, 2, out_dim=1), VPSDE()), torch.randn(B, D)
    assert critic._silu_mlp_layers(x) is not None
    with torch.no_grad():
        assert critic._silu_mlp_layers(x) is None
    assert critic._silu_mlp_layers(x.clone().requires_grad_(True)) is None
    handle = critic.backbone.net[0].register_forward_hook(lambda *a: None)
    assert critic._silu_mlp_layers(x) is None
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic._silu_mlp_layers(x) is None
    assert Critic(TimeMLP(D, 13, 2), VPSDE(), potential="auto")._silu_mlp_layers(x) is None      # vector output


def test_fused_timemlp_energy_is_the_general_route():
    """``EnergyScore(TimeMLP(d))`` through the inner-product energy ``E = <x, f> / (2 sigma_t)`` takes
    ``grad_x E = (f + J_f^T x) / (2 sigma_t)`` with ``J_f^T x`` from one fused node (``double_backward.silu_mlp_vjp``).
    Same function and gradients as the general route (``input_gradient``): the score, the DSM loss and every parameter
    gradient agree to 1e-12 relative in float64 (rounding of the same sums in another order) and 2e-5 in float32, from
    d = 3 to a flattened 28x28 image (d = 784), for energy ``"inner"`` and ``"auto"``; the state dict is untouched."""
    cases = ((D, torch.float64, 1e-12, "inner"), (D, torch.float32, 2e-5, "auto"), (64, torch.float64, 1e-12, "auto"),
             (784, torch.float64, 1e-12, "inner"))
    for dim, dtype, tol, energy in cases:
        torch.manual_seed(0)
        sde = VPSDE()
        model = EnergyScore(TimeMLP(dim, 19, 3), sde, energy=energy).to(dtype)
        keys = list(model.state_dict())
        x0 = torch.randn(B, dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
        t = torch.rand(B, dtype=dtype, generator=torch.Generator().manual_seed(4)) * 0.9 + 0.05
        out = {}
        for fused in (True, False):
            model.fused_input_gradient = fused
            assert (model._silu_mlp_layers(x0) is not None) == fused
            score = model(x0, t).detach()
            loss, grads = _plain(model, sde, x0)
            out[fused] = score, loss, grads
        (s_f, loss_f, grads_f), (s_p, loss_p, grads_p) = out[True], out[False]
        assert torch.allclose(s_f, s_p, rtol=0, atol=tol * s_p.abs().max().item())
        assert torch.allclose(loss_f, loss_p, rtol=tol, atol=0)
        for a, b in zip(grads_f, grads_p):
            assert torch.allclose(a, b, rtol=0, atol=tol * b.abs().max().item() + 1e-300)
        assert list(model.state_dict()) == keys


def test_fused_silu_mlp_vjp_higher_derivatives_and_dispatch():
    """``silu_mlp_vjp(u, d, linears, w)`` (``(J^T w)[:, :d]`` and ``h_L``, ``w`` per sample) against autograd on the
    same MLP in float64 (1e-12 relative): with both outputs used and with ``h_L`` unused, the derivatives of a loss
    of them with respect to ``u``, ``w`` and every parameter, and the third derivative (``create_graph`` through its
    backward, which recomputes the plain graph). ``EnergyScore`` takes it only for a ``TimeMLP`` through the
    inner-product energy, in grad mode, without conditioning, hooks, autocast or an input requiring grad."""
    from gradscore.double_backward import _silu_mlp_input_gradient_plain, silu_mlp_vjp

    torch.manual_seed(0)
    net = TimeMLP(D, 13, 3).double()
    hidden = [m for m in net.net if isinstance(m, torch.nn.Linear)][:-1]
    wb = [p for m in hidden for p in (m.weight, m.bias)]
    u, w = torch.randn(B, D + 32, dtype=torch.float64), torch.randn(B, 13, dtype=torch.float64)
    v, z = torch.randn(B, D, dtype=torch.float64), torch.randn(B, 13, dtype=torch.float64)

    def close(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-12 * b.abs().max().item() + 1e-300)

    for use_h in (True, False):
        out = {}
        for name in ("fused", "plain"):
            uu, ww = u.clone().requires_grad_(True), w.clone().requires_grad_(True)
            g, h = (silu_mlp_vjp(uu, D, hidden, ww) if name == "fused"
                    else _silu_mlp_input_gradient_plain(uu, D, ww, None, wb))
            loss = (g * v).sum() + (g**2).sum() + (((h * z).sum() + (h**2).sum()) if use_h else 0)
            inputs = [uu, ww, *wb]
            first = torch.autograd.grad(loss, inputs, create_graph=True)
            third = torch.autograd.grad(sum((f**2).sum() for f in first[1:]), inputs[1:])
            out[name] = (g, h, first, third)
        (g_f, h_f, first_f, third_f), (g_p, h_p, first_p, third_p) = out["fused"], out["plain"]
        assert close(g_f, g_p) and close(h_f, h_p)
        assert all(close(a, b) for a, b in zip(first_f, first_p))
        assert all(close(a, b) for a, b in zip(third_f, third_p))

    model, x = EnergyScore(TimeMLP(D, 13, 2), VPSDE()), torch.randn(B, D)
    assert model._silu_mlp_layers(x) is not None
    with torch.no_grad():
        assert model._silu_mlp_layers(x) is None
    assert model._silu_mlp_layers(x.clone().requires_grad_(True)) is None      # the likelihood's divergence
    handle = model.backbone.net[0].register_forward_hook(lambda *a: None)
    assert model._silu_mlp_layers(x) is None
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._silu_mlp_layers(x) is None
    for energy in ("norm", "residual"):
        assert EnergyScore(TimeMLP(D, 13, 2), VPSDE(), energy=energy)._silu_mlp_layers(x) is None
    assert EnergyScore(TimeMLP(D, 13, 2, out_dim=1), VPSDE())._silu_mlp_layers(x) is None        # a scalar energy
    assert EnergyScore(TimeMLP(1, 13, 2), VPSDE())._silu_mlp_layers(torch.randn(B, 1)) is None    # d = 1: scalar
