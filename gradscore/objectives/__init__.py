"""Training objectives. Each is an ``Objective``, called ``objective(model, x0, **cond) -> [B]`` (unreduced).

Build them by name with ``build_objective(name, sde, critic=None, **hparams)``; ``OBJECTIVES`` describes
each (parametrisation, critic, default hyperparameters, ``validate``). ``objective.phases()`` is the
recipe of one optimizer step and ``train_step`` runs it in a plain PyTorch loop; ``prepare`` readies model,
critic and optimizer for accelerate in one call. Helpers
(``draw_perturbation``, ``residual``, ``reverse_gradient``, ``draw_probes``, ``unwrap_model``...) are
imported from their modules."""
from .asymmetry import AsymmetryPenalty
from .base import Objective, Phase, check_critic_prepared
from .dsm import DSMLoss
from .dual_sobolev import DualSobolevLoss
from .energy import EnergyDSMLoss
from .recipe import prepare, train_step
from .registry import OBJECTIVES, ObjectiveSpec, build_objective

__all__ = [
    "Objective", "Phase", "DSMLoss", "EnergyDSMLoss", "DualSobolevLoss", "AsymmetryPenalty",
    "OBJECTIVES", "ObjectiveSpec", "build_objective", "train_step", "prepare", "check_critic_prepared",
]
