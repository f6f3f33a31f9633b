"""gradscore: training objectives and diagnostics for score-based diffusion models that see the
observable (gradient) part of the score error. See THEORY.md for the mathematics."""
from . import toy
from .metrics import energy_distance, sliced_wasserstein
from .nets import TimeMLP
from .objectives import DSMLoss
from .critic import Critic
from .objectives import (OBJECTIVES, AsymmetryPenalty, DualSobolevLoss, EnergyDSMLoss, ObjectiveSpec,
                         build_objective)
from .parametrisation import ENERGIES, EnergyScore, ScoreModel
from .sampling import sample
from .sde import SDE, DiscreteVPSDE, VESDE, VPSDE

from . import diagnostics  # noqa: E402  (gradscore.diagnostics: error diagnostics, KL bounds)

__version__ = "0.1.0"
__all__ = [
    "SDE", "VPSDE", "VESDE", "DiscreteVPSDE",
    "ScoreModel", "EnergyScore", "ENERGIES", "TimeMLP",
    "DSMLoss", "sample", "energy_distance", "sliced_wasserstein", "toy",
    "Critic", "DualSobolevLoss", "EnergyDSMLoss", "AsymmetryPenalty", "OBJECTIVES", "ObjectiveSpec", "build_objective",
]
