"""The dual-Sobolev (gradient-projected) objective (THEORY sections 5 and 7).

    min_theta max_eta  E_t lambda(t) E[ 2 r_theta . grad psi_eta(x_t, t) - |grad psi_eta(x_t, t)|^2 ]

with the DSM residual ``r_theta = s_theta(x_t, t) + eps / sigma_t``. For fixed ``theta`` the inner
maximum is ``E_t lambda(t) ||Pi_G e_t||^2`` (the gradient part of the score error, the only part a
sampler sees), attained at ``grad psi = Pi_G e_t``. ``l2_weight > 0`` adds ``l2_weight`` times the
DSM loss ("L2 + projection": ``||e||^2 + ||Pi_G e||^2``, up-weighting what sampling sees).

Both players move with ONE backward: the critic's output passes through a gradient reversal, so
``objective(model, x0).mean().backward()`` gives descent directions for the score parameters
(``+dJ/dtheta``) and for the critic parameters (``-dJ/deta``, i.e. ascent on ``J``); one optimizer
over both parameter sets then performs simultaneous gradient descent-ascent. ``critic_loss`` is the
critic-only loss ``-J`` (score detached) for extra critic steps.

Which mode. Recommended: the simultaneous update (one backward, one optimizer) with ``n_critic=1``
for "l2+dual_sobolev", and ``n_critic=5`` (1 joint + 4 critic-only steps) for "dual_sobolev" alone,
and for "dual_sobolev" alone: **sample an average of the iterates** (an EMA of the score model's
weights, decay 0.99, which train/ keeps by default), with gradient clipping and a short warm-up.
Alone, the score's solenoidal part has no restoring force and the last iterate of descent-ascent
wanders; the averaged iterate converges (the classic behaviour of averaged iterates in min-max games).
Measured with that recipe (``tests/test_objectives_training.py:train_and_sample``: ring8, 1500 steps,
batch 256, Adam 2e-3, warm-up 50, clip 1, EMA 0.99; energy distance of the EMA model's samples),
seeds 0, 1, 2::

    l2                    0.0153  0.0153  0.0164
    dual_sobolev (n=5)    0.0183  0.0190  0.0202      (1.2x L2; last iterate: 0.128 0.048 0.071)

and in the toy ablation behind ``make demo`` (1000 steps, 3 seeds): dual_sobolev 0.0137 +- 0.0015
against l2 0.0113 +- 0.0013. The tables below were measured WITHOUT averaging, clipping or warm-up
(plain Adam, last iterate), which is where the instability shows.
Measured on ring8 (VP), score TimeMLP(2, 128, 3), critic TimeMLP(2, 64, 3, out_dim=1), batch 256,
Adam 2e-3 (one optimizer, critic group lr as listed), 1500 score steps; energy distance of 2000
reverse-SDE samples (200 steps) to the target (floor 0.0014); per-seed values. Reproduce with
``tests/test_objectives_training.py:train_and_sample(name, seed=s, critic_lr=..., n_critic=...)``::

    objective         n_critic  critic lr      energy distance (seeds 0, 1, 2)   time / L2 step
    l2                   -         -           0.0147  0.0262  0.0153              1x
    energy               -         -           0.0065  0.0247                      2.2x
    asymmetry (w=1)      -         -           0.0166  0.0147                      2.8x
    l2+dual_sobolev      1       2e-3          0.0148  0.0279                      2.2x
    l2+dual_sobolev      3       2e-3          0.0291  0.0140                      5.6x
    dual_sobolev         1       2e-3          diverges (solenoidal part -> 1e6)   2.3x
    dual_sobolev         1       1e-2          0.25    1.28    48 (unstable)
    dual_sobolev         3       2e-3          0.27    0.33    0.12
    dual_sobolev         3   4e-3, Adam b1=.5  0.081                               5.6x
    dual_sobolev         5       2e-3          0.040   0.0995                      9.1x
    dual_sobolev         5   4e-3, Adam b1=.5  0.090   0.017                       9.1x
    dual_sobolev         8       2e-3          0.042   0.022                       14x

Optimizer variants for "dual_sobolev" alone (same harness; score and critic in separate optimizers,
which for Adam equals one optimizer with two groups; critic Adam lr 2e-3 unless listed; "cb" =
critic Adam betas (0.5, 0.9); "opt" = optimistic score gradient ``2 g_k - g_{k-1}`` fed to Adam;
"wd" = AdamW weight decay on the score group only). None is within 2x of L2 (mean 0.0187) on 3 seeds::

    n_critic  score optimizer                 critic        energy distance (seeds 0, 1, 2)
    1         Adam eps=1e-3                   Adam          diverges
    1         SGD momentum .9, lr 2e-3        Adam          0.26
    1         SGD momentum .9, lr 1e-2        Adam          NaN by step 300
    1         Adam lr 5e-4 (two timescales)   Adam          0.94
    1         Adam betas (0, .999)            Adam / cb     diverges by step 150
    1         Adam                            cb            0.125
    1         Adam lr 1e-3                    cb, lr 4e-3   0.100
    1         Adam + opt                      Adam          diverges
    1         Adam + opt                      cb            0.057
    1         Adam + opt                      cb + opt      0.091
    2         Adam + opt                      cb            0.108
    3         Adam                            cb            0.026   0.090   0.036   (mean 0.050, 2.7x)
    3         Adam + opt                      cb            0.044   0.026   0.077   (mean 0.049, 2.6x)
    3         Adam lr 1e-3 + opt              cb            0.041   0.029
    3         AdamW wd 0.1                    cb            0.032   0.034   0.073   (mean 0.046, 2.5x)
    3         AdamW wd 0.1 + opt              cb            0.031   0.046   0.034   (mean 0.037, 1.98x)
    3         AdamW wd 0.3 + opt              cb            -       0.035

The gradients the score receives are not tiny (RMS 0.1-1 after 100 steps, about as large as
L2's), so Adam amplifying pure finite-batch noise is not the whole story; eps=1e-3 is still small
next to that scale (an eps near 0.1, i.e. close to SGD, was not tried) and diverges as the default does. What helps is making the critic respond faster (betas (0.5, 0.9),
n_critic=3), and weight decay on the score. The best variant (n_critic=3, cb, wd 0.1, opt) sits at
the 2x bound on 3 seeds, with the same seed-to-seed spread; it is not adopted as the default.

With L2 in the loss every direction has a restoring force and one joint step per score step is as
good as three critic steps, at 40% of the time (times: medians of interleaved runs in one process,
1 thread, batch 256: l2 18 ms/step; a joint dual-Sobolev step 2.2x, an extra critic_loss step 1.7x).
Without it the score learns only through the critic and its solenoidal part has no restoring
force: a lagging critic lets the score drift (Adam turns tiny gradients into full-size steps), so
the critic must be kept near its best response; even then "dual_sobolev" alone is at 1-5x L2's distance at this budget, with a large
seed-to-seed spread (default n_critic=5: mean 0.070 over seeds 0, 1, 3.4x L2's mean, at 9x its time
per step) without averaging. With the EMA recipe above it is within 1.2x of L2.
"""
from __future__ import annotations

import torch

from ..sde import SDE, broadcast_to
from .dsm import draw_perturbation, residual
from .weighting import check_nonnegative, resolve_weighting, weight

__all__ = ["DualSobolevLoss", "reverse_gradient"]


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is negated (min-max in one backward)."""
    return _ReverseGradient.apply(x)


def _check_n_critic(n_critic):
    if isinstance(n_critic, bool) or not isinstance(n_critic, int) or n_critic < 1:
        raise ValueError(f"n_critic must be an integer >= 1 (critic updates per score step), got {n_critic!r}")
    return n_critic


class DualSobolevLoss:
    """Gradient-projected min-max objective with a scalar critic.

    Args:
        sde: the forward process.
        critic: a ``gradscore.Critic`` (or any module ``(x, t) -> grad_x psi`` shaped like ``x``,
            possibly DDP-wrapped). Read through ``self.critic`` at every call, so a driver may
            replace it by its prepared/wrapped version.
        weighting: ``lambda(t)``: ``"sigma2"`` (default; with ``psi = psi~ / sigma_t`` every term
            is of order one at every ``t``), ``"likelihood"`` (``g^2``), ``"none"``, or a callable.
        l2_weight: weight of the added DSM term (0: projection only, the solenoidal part is left free).
        n_critic: critic updates per score step: the joint step updates the critic once, and a
            driver runs ``n_critic - 1`` extra steps on ``critic_loss``.
    Call: ``objective(model, x0, t=None, noise=None, generator=None) -> [B]``, per sample
    ``lambda(t) (2 r . g - |g|^2) + l2_weight lambda(t) |r|^2`` with ``g = grad psi(x_t, t)`` passed
    through ``reverse_gradient``. Its value (with ``l2_weight=0``) estimates ``lambda ||Pi_G e||^2``
    from below as the critic improves.
    """

    def __init__(self, sde: SDE, critic, weighting="sigma2", l2_weight: float = 0.0, n_critic: int = 1):
        if critic is None:
            raise ValueError("DualSobolevLoss needs a critic, e.g. gradscore.Critic(TimeMLP(d, out_dim=1), sde)")
        if not callable(critic):
            raise TypeError(f"critic must be a module (x, t) -> grad psi, got {type(critic).__name__}")
        self.sde, self.critic = sde, critic
        self.weighting = resolve_weighting(weighting)
        self.l2_weight = check_nonnegative("l2_weight", l2_weight)
        self.n_critic = _check_n_critic(n_critic)
        self.name = "dual_sobolev" if self.l2_weight == 0 else "l2+dual_sobolev"

    # ------------------------------------------------------------------------------------------
    def _critic_gradient(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = self.critic(xt, t)
        if not isinstance(g, torch.Tensor) or g.shape != xt.shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"critic must return grad_x psi shaped like x {tuple(xt.shape)}, got {shape}; wrap a scalar "
                "backbone as gradscore.Critic(backbone, sde)")
        return g.to(xt.dtype)

    def _terms(self, model, x0, t, noise, generator, detach_score: bool):
        t, xt, eps = draw_perturbation(self.sde, x0, t, noise, generator)
        if detach_score:
            with torch.no_grad():
                score = model(xt, t)
        else:
            score = model(xt, t)
        sigma = self.sde.sigma(t)
        sr = residual(self.sde, score, eps, t)                            # sigma_t r
        g = self._critic_gradient(xt, t)
        lam = weight(self.weighting, self.sde, t) / sigma**2              # lambda / sigma^2
        return t, sr, g, broadcast_to(sigma, xt), lam

    def __call__(self, model, x0: torch.Tensor, t=None, noise=None, generator=None) -> torch.Tensor:
        t, sr, g, sigma, lam = self._terms(model, x0, t, noise, generator, detach_score=False)
        sg = sigma * reverse_gradient(g)                                  # sigma_t grad psi
        proj = (2 * sr * sg - sg**2).flatten(1).sum(1)
        loss = lam * proj
        if self.l2_weight > 0:
            loss = loss + self.l2_weight * lam * sr.flatten(1).pow(2).sum(1)
        return loss

    def critic_loss(self, model, x0: torch.Tensor, t=None, noise=None, generator=None) -> torch.Tensor:
        """``-lambda(t) (2 r . g - |g|^2)`` per sample, ``[B]``, with the score detached (computed
        under ``no_grad``, so a DDP-wrapped model is not left waiting for a backward)."""
        t, sr, g, sigma, lam = self._terms(model, x0, t, noise, generator, detach_score=True)
        sg = sigma * g
        return -lam * (2 * sr * sg - sg**2).flatten(1).sum(1)

    def projection(self, model, x0: torch.Tensor, t=None, noise=None, generator=None) -> torch.Tensor:
        """Diagnostic ``lambda(t) (2 r . g - |g|^2)`` per sample without gradients; its mean over
        held-out samples is an unbiased estimate of a lower bound on ``lambda ||Pi_G e_t||^2``."""
        with torch.no_grad():
            return -self.critic_loss(model, x0, t=t, noise=noise, generator=generator)

    def __repr__(self):
        return f"DualSobolevLoss(name={self.name!r}, l2_weight={self.l2_weight}, n_critic={self.n_critic})"
