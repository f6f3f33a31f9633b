"""Backbones, critics and one training step per objective, built from ``gradscore.OBJECTIVES``.

A ``Step`` owns a copy of the backbone (and a critic when the objective needs one) and an Adam
optimizer over all trained parameters; ``step()`` is one forward + backward + optimizer step on a
fixed batch, ``forward()`` only builds the loss (for memory accounting).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

import gradscore
import gradscore.double_backward
from gradscore.nets import FourierTime
from gradscore_train.loop import make_optimizer

__all__ = ["Step", "toy_case", "toy_critic_sweep_case", "unet_case", "wide_critic_step", "ConvCritic", "make_unet",
           "n_params", "OBJECTIVE_NAMES"]


def _objective_names():
    return list(getattr(gradscore, "OBJECTIVES", {"l2": None, "energy": None}))


OBJECTIVE_NAMES = _objective_names()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class Step:
    """One objective on one backbone copy: ``step()`` = zero_grad, loss, backward, AdamW step."""

    def __init__(self, name, model, objective, x0, critic=None, lr=1e-4, seed=0, math_attention=False):
        self.name, self.model, self.objective, self.x0, self.critic = name, model, objective, x0, critic
        self.math_attention = math_attention
        self.params = [*model.parameters(), *(critic.parameters() if critic is not None else [])]
        self.opt = make_optimizer(self.params, lr)         # the training driver's optimizer (fused AdamW)
        self.seed = seed
        self.bf16 = False                                  # run the loss under bf16 autocast on x0's device

    def forward(self):
        g = torch.Generator().manual_seed(self.seed)
        with (gradscore.double_backward.math_attention() if self.math_attention else contextlib.nullcontext()), \
                torch.autocast(self.x0.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.objective(self.model, self.x0, generator=g).mean()

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.forward().backward()
        self.opt.step()

    __call__ = step


def _build(name, sde, backbone, critic_backbone_fn, x0):
    """A ``Step`` for objective ``name`` on a copy of ``backbone``: ``spec.parametrisation`` picks
    ``ScoreModel`` (eps output) or ``EnergyScore`` (default energy), ``spec.needs_critic`` adds
    ``gradscore.Critic(critic_backbone_fn(), sde)``. Without a registry only "l2"/"energy" exist."""
    spec = gradscore.OBJECTIVES[name] if hasattr(gradscore, "OBJECTIVES") else None
    param = spec.parametrisation if spec is not None else ("energy" if name == "energy" else "score")
    if param == "energy":
        model = gradscore.EnergyScore(copy.deepcopy(backbone), sde)
    else:
        model = gradscore.ScoreModel(copy.deepcopy(backbone), sde)
    critic = None
    if spec is not None and spec.needs_critic:
        critic = gradscore.Critic(critic_backbone_fn(), sde)
    if spec is not None:
        objective = gradscore.build_objective(name, sde, critic=critic)
    else:
        objective = gradscore.DSMLoss(sde)
    # The asymmetry penalty differentiates the score twice; fused SDPA kernels have no double
    # backward, so its steps run on the math kernel (AsymmetryPenalty does not select it itself).
    return Step(name, model, objective, x0, critic, math_attention=(name == "asymmetry"))


# --------------------------------------------------------------------------------------------- toy
def toy_critic_hidden(score_params: int, dim: int = 2, depth: int = 3, frac: float = 0.25) -> int:
    """Largest width of a ``TimeMLP(dim, h, depth, out_dim=1)`` with at most ``frac`` of ``score_params``."""
    h = 1
    while n_params(gradscore.TimeMLP(dim, h + 1, depth, out_dim=1)) <= frac * score_params:
        h += 1
    return h


def _toy_inputs(batch, hidden, depth, seed):
    """``(sde, x0 [batch, 2] from ring8, score backbone TimeMLP(2, hidden, depth))``, seeded."""
    torch.manual_seed(seed)
    x0 = gradscore.toy.GaussianMixture.preset("ring8").sample(batch, generator=torch.Generator().manual_seed(seed))
    return gradscore.VPSDE(), x0, gradscore.TimeMLP(2, hidden, depth)


def toy_case(batch=512, hidden=128, depth=3, names=None, seed=0):
    """MLP (``TimeMLP(2, hidden, depth)``) on the ring8 mixture; returns ``({name: Step}, info)``."""
    sde, x0, score = _toy_inputs(batch, hidden, depth, seed)
    h = toy_critic_hidden(n_params(score), 2, depth)
    critic_fn = lambda: gradscore.TimeMLP(2, h, depth, out_dim=1)  # noqa: E731
    steps = {n: _build(n, sde, score, critic_fn, x0) for n in (names or OBJECTIVE_NAMES)}
    info = dict(backbone=f"TimeMLP(2, {hidden}, {depth})", params=n_params(score), batch=batch,
                critic=f"TimeMLP(2, {h}, {depth}, out_dim=1)", critic_params=n_params(critic_fn()))
    return steps, info


def toy_critic_sweep_case(batch=512, critics=((59, 3), (32, 2), (16, 2)), hidden=128, depth=3, seed=0,
                          name="l2+dual_sobolev"):
    """``{"l2": Step, "<name> h<width> d<depth>": Step, ...}`` on the toy MLP: the critic objective
    with ``TimeMLP(2, width, depth, out_dim=1)`` critics of decreasing size; and ``{label: share}``."""
    sde, x0, score = _toy_inputs(batch, hidden, depth, seed)
    steps, shares = {"l2": _build("l2", sde, score, None, x0)}, {}
    for h, d in critics:
        fn = lambda h=h, d=d: gradscore.TimeMLP(2, h, d, out_dim=1)  # noqa: E731
        label = f"{name} critic TimeMLP(2, {h}, {d})"
        steps[label] = _build(name, sde, score, fn, x0)
        shares[label] = n_params(fn()) / n_params(score)
    return steps, shares


# -------------------------------------------------------------------------------------------- UNet
def make_unet(size: int, attention: bool = True, channels=(32, 64)):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                       down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
                       add_attention=attention)


class ConvCritic(nn.Module):
    """Small scalar critic ``(x [B, C, H, W], t [B]) -> [B]``: three stride-2 SiLU convolutions with
    a Fourier time embedding added to the features, global mean, linear head."""

    def __init__(self, channels: int = 3, width=(32, 64, 96), time_dim: int = 32):
        super().__init__()
        self.time = FourierTime(time_dim)
        chans = (channels, *width)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.temb = nn.ModuleList(nn.Linear(time_dim, b) for b in width)
        self.head = nn.Linear(width[-1], 1)
        self.act = nn.SiLU()

    def forward(self, x, t):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        e = self.time(t).to(x.dtype)
        h = x
        for conv, temb in zip(self.convs, self.temb):
            h = self.act(conv(h) + temb(e)[:, :, None, None])
        return self.head(h.mean((2, 3)))[:, 0]


def wide_critic_step(size=16, batch=32, attention=True, seed=0, name="dual_sobolev"):
    """``name`` with a wider ``ConvCritic`` (widths (48, 96, 160): ~21% of the UNet's parameters)."""
    torch.manual_seed(seed)
    sde = gradscore.VPSDE()
    x0 = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    unet = make_unet(size, attention)
    return _build(name, sde, unet, lambda: ConvCritic(3, (48, 96, 160)), x0)


def unet_case(size=16, batch=32, attention=True, names=None, seed=0):
    """diffusers ``UNet2DModel`` (block_out_channels (32, 64), mid attention) on random images."""
    torch.manual_seed(seed)
    sde = gradscore.VPSDE()
    x0 = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    unet = make_unet(size, attention)
    critic_fn = lambda: ConvCritic(3)  # noqa: E731
    steps = {n: _build(n, sde, unet, critic_fn, x0) for n in (names or OBJECTIVE_NAMES)}
    info = dict(backbone=f"UNet2DModel {size}x{size}, (32, 64), {'mid attention' if attention else 'no attention'}",
                params=n_params(unet), batch=batch, critic="ConvCritic(3, (32, 64, 96))",
                critic_params=n_params(critic_fn()))
    return steps, info
