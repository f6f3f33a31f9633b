"""One registry of training objectives, the interface a training driver uses.

    spec = OBJECTIVES[name]           # "l2", "energy", "dual_sobolev", "l2+dual_sobolev", "asymmetry"
    spec.parametrisation              # "score" (build a ScoreModel) or "energy" (build an EnergyScore)
    spec.needs_critic                 # build a gradscore.Critic and pass it
    spec.defaults                     # hyperparameters and their default values
    hparams = spec.validate(hparams)  # defaults filled in; ValueError naming the key, the objective, the expectation
    objective = build_objective(name, sde, critic=None, **hparams)

Every objective is a ``gradscore.objectives.Objective``: ``objective(model, x0, t=None, noise=None,
generator=None, **cond) -> [B]`` (per-sample losses; the caller reduces), ``.name``, ``.critic``, ``.n_critic``,
``.hparams``, ``critic_loss`` and ``phases()``, the recipe of one optimizer step. Driver loop::

    opt = Optimizer([*model.parameters(), *objective.critic.parameters()])   # one optimizer
    for phase in objective.phases():          # n_critic - 1 critic-only phases, then the joint one
        loss = phase.loss(model, x0, **cond).mean(); accelerator.backward(loss); opt.step(); opt.zero_grad()

The joint phase updates the critic too (gradient reversal, see ``dual_sobolev``); a critic-only phase
gives the model's parameters no gradient (``phase.trains_model`` is False).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..sde import SDE
from .asymmetry import AsymmetryPenalty
from .base import Objective
from .dsm import DSMLoss
from .dual_sobolev import DualSobolevLoss
from .energy import EnergyDSMLoss
from .hyperparameters import validate

__all__ = ["ObjectiveSpec", "OBJECTIVES", "build_objective"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """How to build one objective.

    Attributes:
        name: registry key.
        parametrisation: ``"score"`` (``ScoreModel``) or ``"energy"`` (``EnergyScore``).
        needs_critic: whether ``build_objective`` needs a ``critic``.
        defaults: hyperparameter names and default values (read-only).
        factory: ``(sde, critic, **hparams) -> objective``.
        description: one line for help texts and logs.
    """

    name: str
    parametrisation: str
    needs_critic: bool
    defaults: Mapping[str, Any]
    factory: Callable[..., Objective] = field(repr=False)
    description: str = ""

    def validate(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """``hparams`` checked (names, types, values) with the defaults filled in: what ``build`` passes on.

        Raises:
            ValueError: for an unknown name (listing the valid ones) or a bad value (naming the key, this
                objective, what was expected and what was given).
        """
        if not isinstance(hparams, Mapping):
            raise TypeError(f"hyperparameters of objective {self.name!r} must be a mapping name -> value, "
                            f"got {type(hparams).__name__}")
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for objective {self.name!r}; "
                             f"valid: {sorted(self.defaults) or 'none'}")
        return validate(self.name, {**self.defaults, **hparams})

    def build(self, sde: SDE, critic: Callable | None = None, **hparams: Any) -> Objective:
        """Same as ``build_objective(self.name, sde, critic, **hparams)``."""
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a gradscore.SDE, got {type(sde).__name__}")
        resolved = self.validate(hparams)
        if self.needs_critic and critic is None:
            raise ValueError(f"objective {self.name!r} needs a critic: pass critic=gradscore.Critic(backbone, sde) "
                             "with a scalar backbone, e.g. TimeMLP(d, out_dim=1)")
        if not self.needs_critic and critic is not None:
            raise ValueError(f"objective {self.name!r} takes no critic (got {type(critic).__name__}); "
                             f"objectives with a critic: {sorted(k for k, s in OBJECTIVES.items() if s.needs_critic)}")
        return self.factory(sde, critic, **resolved)


def _l2(sde, critic, weighting, reduction):
    return DSMLoss(sde, weighting=weighting, reduction=reduction)


def _energy(sde, critic, weighting, reduction):
    return EnergyDSMLoss(sde, weighting=weighting, reduction=reduction)


def _dual_sobolev(sde, critic, weighting, n_critic, reduction, l2_weight=0.0):
    return DualSobolevLoss(sde, critic, weighting=weighting, l2_weight=l2_weight, n_critic=n_critic,
                           reduction=reduction)


def _asymmetry(sde, critic, weighting, asymmetry_weight, probes, probe, penalty_weighting, reduction):
    return AsymmetryPenalty(sde, weighting=weighting, asymmetry_weight=asymmetry_weight, probes=probes, probe=probe,
                            penalty_weighting=penalty_weighting, reduction=reduction)


_SPECS = [
    ObjectiveSpec("l2", "score", False, MappingProxyType({"weighting": "sigma2", "reduction": "sum"}), _l2,
                  "denoising score matching: lambda |s + eps/sigma|^2"),
    ObjectiveSpec("energy", "energy", False, MappingProxyType({"weighting": "sigma2", "reduction": "sum"}), _energy,
                  "DSM on a conservative model s = -grad E (error lies in the gradient part)"),
    ObjectiveSpec("dual_sobolev", "score", True,
                  MappingProxyType({"weighting": "sigma2", "n_critic": 5, "reduction": "sum"}),
                  _dual_sobolev, "min-max projection term: only the observable gradient part is trained"),
    ObjectiveSpec("l2+dual_sobolev", "score", True,
                  MappingProxyType({"weighting": "sigma2", "n_critic": 1, "l2_weight": 1.0, "reduction": "sum"}),
                  _dual_sobolev,
                  "DSM plus the projection term: ||e||^2 + ||Pi_G e||^2"),
    ObjectiveSpec("asymmetry", "score", False,
                  MappingProxyType({"weighting": "sigma2", "asymmetry_weight": 1.0, "probes": 1, "probe": "rademacher",
                                    "penalty_weighting": "lambda_sigma2", "reduction": "sum"}),
                  _asymmetry, "DSM plus a Hutchinson Jacobian-asymmetry penalty (quasi-conservative baseline; "
                              "penalty_weighting 'lambda_sigma2' (default) or 'sigma2' as Chao et al. 2022)"),
]

OBJECTIVES: Mapping[str, ObjectiveSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def build_objective(name: str, sde: SDE, critic: Callable | None = None, **hparams: Any) -> Objective:
    """Build the objective registered as ``name`` (see ``OBJECTIVES``).

    Args:
        name: one of ``OBJECTIVES``.
        sde: the forward process.
        critic: a ``gradscore.Critic`` when ``OBJECTIVES[name].needs_critic`` (else ``None``).
        **hparams: overrides of ``OBJECTIVES[name].defaults``, checked by ``OBJECTIVES[name].validate``.
    Returns:
        an ``Objective``: ``(model, x0, t=None, noise=None, generator=None, **cond) -> [B]`` with ``.name``,
        ``.critic``, ``.n_critic``, ``.hparams``, ``critic_loss`` and ``phases()``.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}")
    return OBJECTIVES[name].build(sde, critic, **hparams)
