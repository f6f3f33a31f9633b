"""The objective interface every training objective satisfies, and its training recipe.

An objective is called ``objective(model, x0, t=None, noise=None, generator=None) -> [B]`` (per-sample
losses; the caller reduces) and has ``name``, ``critic``, ``n_critic``, ``hparams`` and
``critic_loss``. ``phases()`` states the recipe of one optimizer step once: ``n_critic - 1`` critic-only
steps on ``critic_loss`` first, then the joint step on the objective itself (which updates the critic
too, through a gradient reversal). A driver or a plain loop runs the phases in order, one
``zero_grad / backward / step`` each (``gradscore.objectives.train_step``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Objective", "Phase"]

Loss = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Phase:
    """One optimizer step of an objective's recipe.

    Attributes:
        name: ``"critic_loss"`` for a critic-only step, the objective's name for the joint step.
        loss: ``(model, x0, t=None, noise=None, generator=None) -> [B]``.
        trains_model: ``False`` when the score model gets no gradient (its score is computed under
            ``no_grad``, so a driver may pass the unwrapped model), ``True`` for the joint step.
    """

    name: str
    loss: Loss
    trains_model: bool


class Objective:
    """Base class of the training objectives.

    Attributes:
        name: the registry key (``gradscore.objectives.OBJECTIVES``).
        critic: the critic module, or ``None``. Read at every call, so a driver may replace it by its
            wrapped / prepared version.
        n_critic: critic updates per score step (0 without a critic).
        hparams: the hyperparameters of the registry entry ``name``, validated:
            ``build_objective(obj.name, sde, critic=obj.critic, **obj.hparams)`` builds the same objective.
    """

    name: str = ""
    critic: nn.Module | None = None
    n_critic: int = 0
    hparams: dict[str, Any]

    def __call__(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample losses ``[B]`` of the score ``model`` on data ``x0: [B, *D]``."""
        raise NotImplementedError

    def critic_loss(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The critic-only loss ``[B]`` (score detached); only objectives with a critic have one."""
        raise TypeError(f"objective {self.name!r} has no critic, so no critic_loss (n_critic = {self.n_critic})")

    def phases(self) -> tuple[Phase, ...]:
        """The recipe of one optimizer step: ``n_critic - 1`` critic-only phases, then the joint phase."""
        critic_only = tuple(Phase("critic_loss", self.critic_loss, False) for _ in range(self.n_critic - 1))
        return (*critic_only, Phase(self.name, self, True))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}(name={self.name!r}, {fields})"
