"""gradscore: training objectives and diagnostics for score-based diffusion models that see the
observable (gradient) part of the score error. The mathematics: docs/theory.md."""
from . import diagnostics, toy
from .critic import Critic
from .metrics import energy_distance, sliced_wasserstein
from .nets import TimeMLP
from .objectives import (
    OBJECTIVES,
    AsymmetryPenalty,
    DSMLoss,
    DualSobolevLoss,
    EnergyDSMLoss,
    Objective,
    ObjectiveSpec,
    build_objective,
    prepare,
    train_step,
)
from .parametrisation import ENERGIES, EnergyScore, ScoreModel
from .sampling import guided_score, sample
from .sde import EDMSDE, SDE, VESDE, VPSDE, DiscreteVPSDE

__version__ = "0.1.0"


def __getattr__(name: str):
    """``export_pipeline``, ``load_pretrained`` and ``ScoreEpsUNet`` (``gradscore.pipelines``) on first use, so that
    ``import gradscore`` does not import diffusers."""
    if name in ("export_pipeline", "load_pretrained", "ScoreEpsUNet"):
        from . import pipelines
        return getattr(pipelines, name)
    raise AttributeError(f"module 'gradscore' has no attribute {name!r}")


__all__ = [
    "SDE", "VPSDE", "VESDE", "EDMSDE", "DiscreteVPSDE",
    "ScoreModel", "EnergyScore", "ENERGIES", "TimeMLP",
    "DSMLoss", "sample", "guided_score", "energy_distance", "sliced_wasserstein", "toy",
    "Critic", "DualSobolevLoss", "EnergyDSMLoss", "AsymmetryPenalty", "OBJECTIVES", "ObjectiveSpec", "build_objective",
    "Objective", "train_step", "prepare", "diagnostics", "export_pipeline", "load_pretrained", "ScoreEpsUNet",
]
