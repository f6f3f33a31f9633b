"""The objective interface every training objective satisfies, and its training recipe.

An objective is called ``objective(model, x0, t=None, noise=None, generator=None, **cond) -> [B]``
(per-sample losses; the caller reduces) and has ``name``, ``critic``, ``n_critic``, ``hparams`` and
``critic_loss``. ``cond`` holds conditioning keywords, per-sample tensors aligned with ``x0``
(``class_labels=y``, ``encoder_hidden_states=h``), passed unchanged wherever the model (and the
critic) is evaluated: ``model(x_t, t, **cond)``. Per-sample losses sum over the dimensions of ``x``
(``reduction="sum"``, the default: the scale of the identities in docs/theory.md §7) or average over
them (``reduction="mean"``: the scale of ``F.mse_loss``, ``1/d`` of the sum).
``phases()`` states the recipe of one optimizer step once: ``n_critic - 1`` critic-only
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

__all__ = ["Objective", "Phase", "check_critic_prepared"]

Loss = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Phase:
    """One optimizer step of an objective's recipe.

    Attributes:
        name: ``"critic_loss"`` for a critic-only step, the objective's name for the joint step.
        loss: ``(model, x0, t=None, noise=None, generator=None, **cond) -> [B]``.
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
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 **cond: Any) -> torch.Tensor:
        """Per-sample losses ``[B]`` of the score ``model`` on data ``x0: [B, *D]`` given ``cond``."""
        raise NotImplementedError

    def critic_loss(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    **cond: Any) -> torch.Tensor:
        """The critic-only loss ``[B]`` (score detached); only objectives with a critic have one."""
        raise TypeError(f"objective {self.name!r} has no critic, so no critic_loss (n_critic = {self.n_critic})")

    def reduce(self, per_sample_sum: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """A per-sample loss summed over the dimensions of ``x``, ``[B]``, in this objective's reduction:
        unchanged for ``"sum"``, divided by ``d = x0[0].numel()`` for ``"mean"``."""
        if getattr(self, "reduction", "sum") == "mean":
            return per_sample_sum / x0[0].numel()
        return per_sample_sum

    def phases(self) -> tuple[Phase, ...]:
        """The recipe of one optimizer step: ``n_critic - 1`` critic-only phases, then the joint phase."""
        critic_only = tuple(Phase("critic_loss", self.critic_loss, False) for _ in range(self.n_critic - 1))
        return (*critic_only, Phase(self.name, self, True))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}(name={self.name!r}, {fields})"


def _is_data_parallel(module: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    kinds = [DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        kinds.append(FullyShardedDataParallel)
    except ImportError:                                   # torch built without distributed FSDP
        pass
    return isinstance(module, tuple(kinds)) or type(module).__name__ == "DeepSpeedEngine"


def check_critic_prepared(critic: nn.Module | None, objective: str, model: object = None) -> None:
    """In a multi-process run (``torch.distributed`` initialised, world size > 1) where the score model is
    wrapped for data parallelism (``DistributedDataParallel``, FSDP or DeepSpeed, as ``accelerator.prepare``
    returns it), a trainable critic must be wrapped too: otherwise each rank's critic drifts apart with no
    error. Raises ``RuntimeError`` naming the rank and the fix (``gradscore.objectives.prepare``). A score
    model that is not wrapped marks a computation local to the rank (a reference, or a critic-only phase
    given the unwrapped model, whose joint phase is checked), which is let through."""
    if critic is None or not isinstance(critic, nn.Module):
        return
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    if model is not None and not _is_data_parallel(_uncompiled(model)):
        return
    if _is_data_parallel(_uncompiled(critic)) or not any(p.requires_grad for p in critic.parameters()):
        return
    raise RuntimeError(
        f"objective {objective!r} on rank {dist.get_rank()} of {dist.get_world_size()}: the critic "
        f"{type(critic).__name__} is not wrapped for data parallelism while the score model is, so the critic's "
        "weights would drift apart across ranks; prepare it with the score model and the optimizer: "
        "model, optimizer = gradscore.objectives.prepare(accelerator, model, objective, optimizer)")


def _uncompiled(module: object) -> object:
    inner = getattr(module, "_orig_mod", None)                  # torch.compile's wrapper
    return inner if isinstance(inner, nn.Module) else module
