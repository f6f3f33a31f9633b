"""The energy objective: denoising score matching on a conservative model ``s = -grad_x E``
(docs/theory.md §7). The score error of such a model is itself a gradient, so its DSM loss is the
observable loss ``||Pi_G e_t||^2 + const(t)``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..parametrisation import EnergyScore
from .dsm import DSMLoss

__all__ = ["EnergyDSMLoss", "unwrap_model"]


def unwrap_model(model: Callable) -> Callable:
    """The user's module inside DDP / accelerate / ``torch.compile`` wrappers (``.module``, ``._orig_mod``)."""
    seen = 0
    while seen < 8:
        if isinstance(model, nn.Module) and hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
        seen += 1
    return model


class EnergyDSMLoss(DSMLoss):
    """DSM on an ``EnergyScore`` model (possibly DDP-wrapped).

    Args:
        sde: the forward process.
        weighting: as for ``DSMLoss`` (``"sigma2"`` default, ``"likelihood"``, ``"none"``, ``"min_snr"``,
            ``"edm"``, callable).
        reduction: ``"sum"`` (default) or ``"mean"`` over the dimensions of ``x``, as for ``DSMLoss``.
    Call: ``objective(model, x0, t=None, noise=None, generator=None, **cond) -> [B]``; raises ``TypeError``
    when ``model`` (after unwrapping ``.module``) is not an ``EnergyScore``. Costs a double backward
    (the score is ``-grad_x E``, differentiated again by the optimiser's backward).
    """

    name = "energy"

    def __call__(self, model: Callable, x0: torch.Tensor, t: float | torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 **cond: Any) -> torch.Tensor:
        inner = unwrap_model(model)
        if not isinstance(inner, EnergyScore):
            raise TypeError(
                f"the 'energy' objective needs an EnergyScore model (score = -grad_x E), got {type(inner).__name__}; "
                "build it with gradscore.EnergyScore(backbone, sde), or use the 'l2' objective for a ScoreModel")
        return super().__call__(model, x0, t=t, noise=noise, generator=generator, **cond)
