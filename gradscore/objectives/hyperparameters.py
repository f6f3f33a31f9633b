"""The hyperparameters of the training objectives and their one validation.

Every objective's constructor and the registry (``OBJECTIVES[name].validate``) check values here, so an
error reads the same wherever it comes from: the objective, the key, what was expected (type included)
and what was given.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .weighting import WEIGHTINGS

__all__ = ["Hyperparameter", "HYPERPARAMETERS", "PROBES", "PENALTY_WEIGHTINGS", "REDUCTIONS", "validate"]

PROBES = ("rademacher", "gaussian")
REDUCTIONS = ("sum", "mean")
PENALTY_WEIGHTINGS = ("lambda_sigma2", "sigma2")


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: ``accepts(value)`` decides, ``expected`` says what it wants (for errors),
    ``normalise`` turns an accepted value into the stored one (``int`` weights become ``float``)."""

    name: str
    expected: str
    accepts: Callable[[Any], bool]
    normalise: Callable[[Any], Any] = lambda value: value


def _integer_at_least_one(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _weighting(value: Any) -> bool:
    return callable(value) or (isinstance(value, str) and value in WEIGHTINGS)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


HYPERPARAMETERS: Mapping[str, Hyperparameter] = {h.name: h for h in (
    Hyperparameter("weighting", f"one of {sorted(WEIGHTINGS)} or a callable (sde, t) -> [B]", _weighting),
    Hyperparameter("l2_weight", "a non-negative number (int or float)", _non_negative_number, float),
    Hyperparameter("asymmetry_weight", "a non-negative number (int or float)", _non_negative_number, float),
    Hyperparameter("n_critic", "int >= 1 (critic updates per score step)", _integer_at_least_one),
    Hyperparameter("probes", "int >= 1 (Hutchinson probes per sample)", _integer_at_least_one),
    Hyperparameter("probe", f"one of {list(PROBES)}", _one_of(PROBES)),
    Hyperparameter("reduction", f"one of {list(REDUCTIONS)} (per sample, over the dimensions of x)",
                   _one_of(REDUCTIONS)),
    Hyperparameter("penalty_weighting", f"one of {list(PENALTY_WEIGHTINGS)}", _one_of(PENALTY_WEIGHTINGS)),
)}


def validate(objective: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every value checked against ``HYPERPARAMETERS``; returns them normalised, in the given order.

    Raises:
        ValueError: naming the objective, the key, what was expected and the value given (with its type).
    """
    out = {}
    for key, value in values.items():
        spec = HYPERPARAMETERS.get(key)
        if spec is None:
            raise ValueError(f"objective {objective!r}: {key!r} is not a known hyperparameter; "
                             f"known: {sorted(HYPERPARAMETERS)}")
        if not spec.accepts(value):
            raise ValueError(f"objective {objective!r}: {key} must be {spec.expected}, "
                             f"got {value!r} ({type(value).__name__})")
        out[key] = spec.normalise(value)
    return out
