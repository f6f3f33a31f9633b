"""Training objectives. Each is called ``objective(model, x0) -> [B]`` (unreduced).

Build them by name with ``build_objective(name, sde, critic=None, **hparams)``; ``OBJECTIVES``
describes each (parametrisation, critic, default hyperparameters)."""
from .asymmetry import PROBES, AsymmetryPenalty, asymmetry_probe, draw_probes
from .dsm import DSMLoss, draw_perturbation, residual
from .dual_sobolev import DualSobolevLoss, reverse_gradient
from .energy import EnergyDSMLoss, unwrap_model
from .registry import OBJECTIVES, ObjectiveSpec, build_objective
from .weighting import WEIGHTINGS, resolve_weighting

__all__ = [
    "DSMLoss", "draw_perturbation", "residual", "WEIGHTINGS", "resolve_weighting",
    "EnergyDSMLoss", "unwrap_model",
    "DualSobolevLoss", "reverse_gradient",
    "AsymmetryPenalty", "asymmetry_probe", "draw_probes", "PROBES",
    "OBJECTIVES", "ObjectiveSpec", "build_objective",
]
