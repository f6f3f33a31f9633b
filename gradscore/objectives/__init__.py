"""Training objectives. Each is called ``objective(model, x0) -> [B]`` (unreduced)."""
from .dsm import DSMLoss, draw_perturbation, residual
from .weighting import WEIGHTINGS, resolve_weighting

__all__ = ["DSMLoss", "draw_perturbation", "residual", "WEIGHTINGS", "resolve_weighting"]
