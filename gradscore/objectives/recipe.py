"""One optimizer step of an objective's training recipe, for a plain PyTorch loop.

    for step in range(steps):
        train_step(objective, model, target.sample(256), optimizer, clip=1.0)

runs the objective's ``phases()`` in order: for ``"dual_sobolev"`` (``n_critic = 5``) four critic-only
steps on ``critic_loss``, then the joint step on ``objective(model, x0).mean()``; for the other
objectives just the one step. Learning-rate schedules and weight averaging stay in the caller's loop.
Conditioning keywords go to every phase: ``train_step(objective, model, x0, opt, class_labels=y)``.
``prepare(accelerator, model, objective, optimizer)`` is the one call an accelerate loop needs: it
prepares the score model, the objective's critic and the optimizer together and hands the objective
its prepared critic (an unprepared critic in a multi-process run raises, ``check_critic_prepared``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import Objective

__all__ = ["train_step", "prepare"]

Batch = torch.Tensor | tuple[torch.Tensor, dict[str, Any]]


def train_step(objective: Objective, model: Callable, x0: torch.Tensor | Callable[[], Batch],
               optimizer: torch.optim.Optimizer, clip: float | None = None,
               generator: torch.Generator | None = None, **cond: Any) -> torch.Tensor:
    """Run every phase of ``objective.phases()``: ``zero_grad``, ``loss(model, x0).mean().backward()``,
    optional gradient clipping, ``optimizer.step()``.

    Args:
        objective: any objective (``gradscore.objectives.Objective``).
        model: the score model.
        x0: a batch ``[B, *D]`` used by every phase, or a callable drawing a fresh batch for each phase
            (as the training driver does): ``() -> x0 [B, *D]`` or ``() -> (x0, cond)`` with ``cond`` a dict
            of conditioning tensors aligned with that batch (used in place of ``**cond``).
        optimizer: one optimizer over the score model's and the critic's parameters. Gradients are
            reset to ``None`` before each phase, so a critic-only phase leaves the score model's
            parameters untouched (they get no gradient).
        clip: clip the gradient norm of the optimizer's parameters to this value (``None``: no clipping).
        generator: passed to the losses (times and noise); ``None`` uses the global generator.
        **cond: conditioning keywords for every phase (``class_labels=y``), aligned with ``x0``.
    Returns:
        the joint (last) phase's mean loss, detached.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be a positive number or None, got {clip!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss = None
    for phase in objective.phases():
        batch, batch_cond = x0() if callable(x0) else x0, cond
        if isinstance(batch, tuple):
            batch, batch_cond = batch
        optimizer.zero_grad(set_to_none=True)
        loss = phase.loss(model, batch, generator=generator, **batch_cond).mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
        optimizer.step()
    return loss.detach()


def prepare(accelerator: Any, model: torch.nn.Module, objective: Objective, optimizer: torch.optim.Optimizer
            ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``accelerator.prepare`` of the score model, ``objective.critic`` (when there is one) and the optimizer
    in one call; ``objective.critic`` is replaced by the prepared critic. Returns ``(model, optimizer)``,
    prepared. The optimizer should hold the critic's parameters too (one optimizer over both players)."""
    if objective.critic is None:
        return tuple(accelerator.prepare(model, optimizer))
    model, critic, optimizer = accelerator.prepare(model, objective.critic, optimizer)
    objective.critic = critic
    return model, optimizer
